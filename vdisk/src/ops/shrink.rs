//! Shrinking a closed hosted sparse disk (vmware-vdiskmanager `-k`, VDDK `Shrink`).
//!
//! Per extent file, in place and without extra space:
//! 1. every grain holding only zeros is unmapped (its entry set to 0 in both grain
//!    tables; the disk has no parent, so the grain still reads as zeros);
//! 2. the file is seen as grain-sized slots; the smallest cut is chosen such that
//!    everything above it fits into the free slots below it;
//! 3. directories, then grain tables, then grains above the cut are copied into free
//!    slots below it; each batch of copies is synced before the metadata that points
//!    at it is rewritten, and vacated slots are never reused, so a crash at any point
//!    leaves a consistent file;
//! 4. the file is truncated at the cut.
//!
//! Memory stays bounded: one grain table at a time, a bitmap of one bit per slot
//! (4 MiB for a 2 TiB file) and the list of grain table locations.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::offline::{SparseFile, GTE_ZEROED};
use crate::limits::SECTOR_SIZE;
use crate::ops::closed::{ClosedKind, ClosedLink};
use crate::ops::convert::Progress;
use crate::zeros::is_zero;

/// What a shrink did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShrinkStats {
    /// Bytes of all extent files before.
    pub bytes_before: u64,
    /// Bytes of all extent files after.
    pub bytes_after: u64,
    /// Grains found to hold only zeros and unmapped.
    pub zero_grains: u64,
    /// Grains, grain tables and directories copied to lower places in their file.
    pub moved: u64,
}

/// Largest run of grains read at once when looking for zero grains.
const SCAN_BYTES: u64 = 1 << 20;
/// Bytes of grains copied between two syncs.
const MOVE_BATCH_BYTES: u64 = 32 << 20;

/// Shrinks the closed disk at `path`: reclaims grains that hold only zeros and space
/// no table references. The virtual content is unchanged. Only hosted sparse disks
/// can shrink; other types fail with `CantShrink` and are not changed.
pub fn shrink(path: &Path, progress: Progress<'_>) -> Result<ShrinkStats> {
    shrink_inner(path, progress).map_err(|e| e.within(path.display()))
}

fn shrink_inner(path: &Path, progress: Progress<'_>) -> Result<ShrinkStats> {
    let link = ClosedLink::open(path)?;
    let mut files = link.sparse_files(|kind| {
        let why = match kind {
            ClosedKind::Flat => "preallocated (flat) extents cannot shrink; convert the disk to a growable type instead",
            ClosedKind::SeSparse => "seSparse disks cannot shrink here (their free-space bitmap is not understood)",
            _ => "streamOptimized disks are compressed and already hold no free space",
        };
        Error::new(ErrorKind::CantShrink, why)
    })?;
    // Tables that disagree, a copy a directory lost, a grain cut short: what check
    // finds, repair may recover, and shrink would treat as free space.
    crate::ops::check::require_clean(path)?;
    let total_tables: u64 = files.iter().map(|f| f.gd.len() as u64).sum::<u64>() * 3;
    let mut done = 0u64;
    let mut stats = ShrinkStats::default();
    for f in &mut files {
        stats.bytes_before += f.file_len;
        let mut tick = |n: u64| -> Result<()> {
            done += n;
            if progress(done, total_tables) {
                Ok(())
            } else {
                Err(Error::new(ErrorKind::Cancelled, "shrink cancelled"))
            }
        };
        let map = unmap_zero_grains(f, &mut stats, &mut tick)?;
        compact(f, map, &mut stats, &mut tick)?;
        stats.bytes_after += f.file_len;
    }
    progress(total_tables, total_tables);
    Ok(stats)
}

/// Occupancy of a file in grain-sized slots.
struct SlotMap {
    slot_sectors: u64,
    used: Vec<u64>,
    slots: u64,
    /// Slots below this one hold the header and descriptor and can never move.
    fixed_end: u64,
}

impl SlotMap {
    fn new(slot_sectors: u64, file_sectors: u64) -> SlotMap {
        let slots = file_sectors.div_ceil(slot_sectors);
        SlotMap {
            slot_sectors,
            used: vec![0; slots.div_ceil(64) as usize],
            slots,
            fixed_end: 0,
        }
    }

    fn is_used(&self, s: u64) -> bool {
        self.used[(s / 64) as usize] & (1 << (s % 64)) != 0
    }

    fn set(&mut self, s: u64, on: bool) {
        let w = &mut self.used[(s / 64) as usize];
        if on {
            *w |= 1 << (s % 64);
        } else {
            *w &= !(1 << (s % 64));
        }
    }

    /// Marks the slots `[start, start+sectors)` (in sectors) touches.
    fn mark(&mut self, start: u64, sectors: u64) {
        let first = start / self.slot_sectors;
        let last = (start + sectors.max(1) - 1) / self.slot_sectors;
        for s in first..=last.min(self.slots.saturating_sub(1)) {
            self.set(s, true);
        }
    }

    fn slot_of(&self, sector: u64) -> u64 {
        sector / self.slot_sectors
    }

    /// The smallest cut (in slots) such that the used slots at or above it fit into
    /// the free slots below it.
    fn cut(&self, floor: u64) -> u64 {
        let free_below: u64 = (0..self.slots).filter(|&s| !self.is_used(s)).count() as u64;
        let mut free = free_below;
        let mut used_above = 0u64;
        let mut c = self.slots;
        while c > floor {
            let s = c - 1;
            let (f, u) = if self.is_used(s) {
                (free, used_above + 1)
            } else {
                (free - 1, used_above)
            };
            if f < u {
                break;
            }
            free = f;
            used_above = u;
            c = s;
        }
        c
    }

    /// The lowest free slot at or after `from` and below `cut`.
    fn next_free(&self, from: u64, cut: u64) -> Option<u64> {
        (from..cut).find(|&s| !self.is_used(s))
    }

    /// The lowest run of `n` free slots below `cut`.
    fn free_run(&self, n: u64, cut: u64) -> Option<u64> {
        let mut run = 0;
        for s in 0..cut {
            if self.is_used(s) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(s + 1 - n);
                }
            }
        }
        None
    }
}

/// Walks every grain table: unmaps grains holding only zeros, verifies the tables,
/// and returns the file's slot occupancy.
fn unmap_zero_grains(
    f: &mut SparseFile,
    stats: &mut ShrinkStats,
    tick: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<SlotMap> {
    let g = f.grain_sectors();
    let gb = f.header.grain_bytes();
    let file_sectors = f.file_len.div_ceil(SECTOR_SIZE);
    let mut map = SlotMap::new(g, file_sectors);
    let meta = f.metadata_ranges()?;
    let h = &f.header;
    let fixed = if h.descriptor_offset != 0 {
        h.descriptor_offset + h.descriptor_size
    } else {
        1
    };
    map.fixed_end = fixed.div_ceil(g);
    for m in &meta {
        map.mark(m.0, m.1 - m.0);
    }
    let mut starts = SlotMap::new(g, file_sectors);
    let per = f.gtes_per_gt();
    let mut buf = vec![0u8; SCAN_BYTES.max(gb) as usize];
    for index in 0..f.gd.len() {
        let gt = f.gd[index];
        if gt == 0 {
            f.no_redundant_table(index)?;
            tick(2)?;
            continue;
        }
        let mut table = f.read_checked_table(index)?;
        tick(1)?;
        let mut changed = false;
        let mut j = 0;
        while j < per {
            let e = u64::from(table[j]);
            if e <= u64::from(GTE_ZEROED) {
                j += 1;
                continue;
            }
            let grain = (index * per + j) as u64;
            f.check_grain(&meta, index, j, grain, e)?;
            // A run of grains stored back to back, read at once.
            let mut n = 1;
            while j + n < per
                && (n as u64 + 1) * gb <= buf.len() as u64
                && u64::from(table[j + n]) == e + n as u64 * g
                && e * SECTOR_SIZE + (n as u64 + 1) * gb <= f.file_len
                && f.check_grain(&meta, index, j + n, grain + n as u64, e + n as u64 * g)
                    .is_ok()
            {
                n += 1;
            }
            let span = (n as u64 * gb) as usize;
            let bytes = (span as u64).min(f.file_len - e * SECTOR_SIZE) as usize;
            buf[bytes..span].fill(0);
            f.read_bytes(&mut buf[..bytes], e * SECTOR_SIZE)?;
            for k in 0..n {
                let s = e + k as u64 * g;
                let chunk = &buf[k * gb as usize..(k + 1) * gb as usize];
                let valid = f.grain_valid_bytes(grain + k as u64) as usize;
                if is_zero(&chunk[..valid]) {
                    table[j + k] = 0;
                    changed = true;
                    stats.zero_grains += 1;
                    continue;
                }
                if s.is_multiple_of(g) {
                    let slot = map.slot_of(s);
                    if starts.is_used(slot) {
                        return Err(
                            f.needs_repair(format!("two grain table entries point to sector {s}"))
                        );
                    }
                    starts.set(slot, true);
                }
                map.mark(s, g);
            }
            j += n;
        }
        if changed {
            f.write_table(index, &table)?;
        }
        tick(1)?;
    }
    f.sync()?;
    Ok(map)
}

/// The cut was chosen so that everything above it fits below; running out of room
/// is a bug, reported before anything is truncated.
fn no_room(f: &SparseFile, what: &str) -> Error {
    Error::new(
        ErrorKind::Fail,
        format!("{}: no free slot left below the cut for {what}", f.name()),
    )
}

/// Moves everything above the cut into free slots below it and truncates.
fn compact(
    f: &mut SparseFile,
    mut map: SlotMap,
    stats: &mut ShrinkStats,
    tick: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<()> {
    let g = f.grain_sectors();
    let gb = f.header.grain_bytes();
    let gds = f.header.gd_sectors();
    let mut floor = map.fixed_end;
    // Directories move as whole runs of slots; one that finds no room pins the cut.
    let mut cut = map.cut(floor);
    let dirs: Vec<bool> = if f.rgd.is_some() {
        vec![false, true]
    } else {
        vec![false]
    };
    let mut dir_moves = Vec::new();
    for &redundant in &dirs {
        let at = if redundant {
            f.header.rgd_offset
        } else {
            f.header.gd_offset
        };
        let end = at + gds;
        if end.div_ceil(g) <= cut {
            continue;
        }
        let n = gds.div_ceil(g);
        match map.free_run(n, cut.min(map.slot_of(at))) {
            Some(run) => {
                for s in run..run + n {
                    map.set(s, true);
                }
                // Slots wholly inside the old place are vacated.
                for s in at.div_ceil(g)..end / g {
                    map.set(s, false);
                }
                dir_moves.push((redundant, run * g));
            }
            None => {
                floor = floor.max(end.div_ceil(g));
            }
        }
        cut = map.cut(floor);
    }
    if !dir_moves.is_empty() {
        let mut buf = vec![0u8; (gds * SECTOR_SIZE) as usize];
        for &(redundant, to) in &dir_moves {
            let from = if redundant {
                f.header.rgd_offset
            } else {
                f.header.gd_offset
            };
            f.read_bytes(&mut buf, from * SECTOR_SIZE)?;
            f.write_bytes(&buf, to * SECTOR_SIZE)?;
        }
        f.sync()?;
        for &(redundant, to) in &dir_moves {
            if redundant {
                f.header.rgd_offset = to;
            } else {
                f.header.gd_offset = to;
            }
            stats.moved += 1;
        }
        f.write_header()?;
        f.sync()?;
    }

    // Grain tables above the cut, packed into free slots below it.
    let gts = f.gt_sectors();
    let tables_per_slot = (g / gts).max(1);
    let mut table_moves: Vec<(bool, usize, u64)> = Vec::new();
    let mut slot_cursor = 0u64;
    let mut packing: Option<(u64, u64)> = None; // (slot start sector, tables placed)
    for redundant in [false, true] {
        let Some(dir) = (if redundant {
            f.rgd.as_ref()
        } else {
            Some(&f.gd)
        }) else {
            continue;
        };
        for (i, &e) in dir.iter().enumerate() {
            let e = u64::from(e);
            if e == 0 || (e + gts).div_ceil(g) <= cut {
                continue;
            }
            let to = match packing {
                Some((start, placed)) if placed < tables_per_slot && gts <= g => {
                    packing = Some((start, placed + 1));
                    start + placed * gts
                }
                _ => {
                    let s = map
                        .next_free(slot_cursor, cut)
                        .ok_or_else(|| no_room(f, "a grain table"))?;
                    map.set(s, true);
                    slot_cursor = s + 1;
                    packing = Some((s * g, 1));
                    s * g
                }
            };
            table_moves.push((redundant, i, to));
        }
    }
    if !table_moves.is_empty() {
        for &(redundant, i, to) in &table_moves {
            let from = if redundant {
                f.rgd.as_ref().map_or(0, |r| r[i])
            } else {
                f.gd[i]
            };
            let t = f.read_table(from)?;
            f.write_table_at(to as u32, &t)?;
        }
        f.sync()?;
        for &(redundant, i, to) in &table_moves {
            if redundant {
                if let Some(r) = f.rgd.as_mut() {
                    r[i] = to as u32;
                }
            } else {
                f.gd[i] = to as u32;
            }
            stats.moved += 1;
        }
        f.write_directories()?;
        f.sync()?;
    }

    // Grains above the cut.
    let per = f.gtes_per_gt();
    let mut pending: BTreeMap<usize, Vec<(usize, u32)>> = BTreeMap::new();
    let mut pending_bytes = 0u64;
    let mut buf = vec![0u8; gb as usize];
    for index in 0..f.gd.len() {
        if f.gd[index] == 0 {
            tick(1)?;
            continue;
        }
        let table = f.read_table(f.gd[index])?;
        for (j, &e) in table.iter().enumerate().take(per) {
            let e = u64::from(e);
            if e <= u64::from(GTE_ZEROED) || (e + g).div_ceil(g) <= cut {
                continue;
            }
            let s = map
                .next_free(slot_cursor, cut)
                .ok_or_else(|| no_room(f, "a grain"))?;
            map.set(s, true);
            slot_cursor = s + 1;
            // The last grain of a file may be cut short by its end.
            let have = gb.min(f.file_len.saturating_sub(e * SECTOR_SIZE)) as usize;
            buf[have..].fill(0);
            f.read_bytes(&mut buf[..have], e * SECTOR_SIZE)?;
            f.write_bytes(&buf, s * g * SECTOR_SIZE)?;
            pending.entry(index).or_default().push((j, (s * g) as u32));
            pending_bytes += gb;
            stats.moved += 1;
            if pending_bytes >= MOVE_BATCH_BYTES {
                commit_moves(f, &mut pending)?;
                pending_bytes = 0;
            }
        }
        tick(1)?;
    }
    commit_moves(f, &mut pending)?;

    let new_len = (cut * g * SECTOR_SIZE).min(f.file_len);
    if new_len < f.file_len {
        f.set_len(new_len)?;
        f.sync()?;
    }
    Ok(())
}

/// Syncs copied grains, then points their table entries at the new places.
fn commit_moves(
    f: &mut SparseFile,
    pending: &mut BTreeMap<usize, Vec<(usize, u32)>>,
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    f.sync()?;
    for (index, moves) in std::mem::take(pending) {
        let mut table = f.read_table(f.gd[index])?;
        for (j, to) in moves {
            table[j] = to;
        }
        f.write_table(index, &table)?;
    }
    f.sync()
}
