//! Defragmenting a closed hosted sparse disk (vmware-vdiskmanager `-d`, VDDK
//! `Defragment`).
//!
//! Each extent file is rewritten beside the original with the layout of a new file
//! (header, descriptor, directories, preallocated tables) followed by its grains in
//! guest order, so a sequential guest read is a sequential host read. The new file
//! is written under a temporary name, synced and renamed over the original
//! ([`crate::replace::NewFile`]): a failure or crash leaves the original untouched
//! (at worst a hidden temporary file beside it, which the next run removes). Allocation does not change:
//! every data grain and zeroed-grain entry is kept, CID and descriptor stay the same.
//! Needs free host space for one extent file at a time.

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::offline::{SparseFile, GTE_UNALLOCATED, GTE_ZEROED};
use crate::limits::{MAX_SPARSE_FILE_SECTORS, SECTOR_SIZE};
use crate::ops::closed::{ClosedKind, ClosedLink};
use crate::ops::convert::Progress;
use crate::ops::create::write_new_sparse;
use crate::replace::NewFile;
use crate::storage::{FileStorage, LockMode, Storage};

/// What a defragmentation found and left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefragStats {
    /// Fragments before: per extent, 1 + the number of places where the next data
    /// grain in guest order is not stored right after the previous one (0 without
    /// data), summed over the extents.
    pub fragments_before: u64,
    /// Fragments after (the number of extents holding data).
    pub fragments_after: u64,
}

/// Bytes of grains gathered before one write to the new file.
const WRITE_BATCH_BYTES: usize = 4 << 20;

/// Defragments the closed disk at `path`. Only hosted sparse disks can be
/// defragmented; flat and streamOptimized disks fail with `NotSupported` unchanged.
pub fn defragment(path: &Path, progress: Progress<'_>) -> Result<DefragStats> {
    defrag_inner(path, progress).map_err(|e| e.within(path.display()))
}

fn defrag_inner(path: &Path, progress: Progress<'_>) -> Result<DefragStats> {
    let link = ClosedLink::open(path)?;
    let files = link.sparse_files(|kind| {
        let why = match kind {
            ClosedKind::Flat => "preallocated (flat) disks are stored in guest order already; only growable (sparse) disks can be defragmented",
            ClosedKind::SeSparse => "seSparse disks cannot be defragmented",
            _ => "streamOptimized disks cannot be defragmented; convert the disk to a growable type instead",
        };
        Error::new(ErrorKind::NotSupported, why)
    })?;
    // What check finds, repair may recover; rewriting the file first would lose it.
    crate::ops::check::require_clean(path)?;
    let total: u64 = files.iter().map(|f| f.gd.len() as u64).sum();
    let mut done = 0u64;
    let mut stats = DefragStats::default();
    // The rewritten files, kept locked until the end.
    let mut held = Vec::with_capacity(files.len());
    for f in &files {
        let mut tick = || -> Result<()> {
            done += 1;
            if progress(done, total) {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Cancelled,
                    "defragmentation cancelled",
                ))
            }
        };
        let (before, after, placed) = rewrite(f, &mut tick)?;
        stats.fragments_before += before;
        stats.fragments_after += after;
        held.push(placed);
    }
    progress(total, total);
    Ok(stats)
}

/// Counts fragments of grain sectors in guest order.
#[derive(Default)]
struct Fragments {
    count: u64,
    next: Option<u64>,
}

impl Fragments {
    fn add(&mut self, sector: u64, grain_sectors: u64) {
        if self.next != Some(sector) {
            self.count += 1;
        }
        self.next = Some(sector + grain_sectors);
    }
}

/// Rewrites one extent file in guest order; returns fragments before and after,
/// and the new file's handle (locked exclusively, as the original was: held until
/// the whole disk is done).
fn rewrite(
    f: &SparseFile,
    tick: &mut dyn FnMut() -> Result<()>,
) -> Result<(u64, u64, FileStorage)> {
    let original = f.storage.path().to_path_buf();
    let new_file = NewFile::beside(&original, LockMode::Exclusive, true)?;
    let tmp_path = new_file.temp_path().to_path_buf();
    let out = new_file.storage();
    let mut header = f.header.clone();
    header.unclean_shutdown = false;
    let header = header.fresh_layout()?;
    let descriptor = match header.descriptor_offset {
        0 => None,
        _ => {
            let mut d = vec![0u8; (f.header.descriptor_size * SECTOR_SIZE) as usize];
            f.read_bytes(&mut d, f.header.descriptor_offset * SECTOR_SIZE)?;
            Some(d)
        }
    };
    write_new_sparse(out, &header, descriptor.as_deref())?;

    let meta = f.metadata_ranges()?;
    let g = f.grain_sectors();
    let gb = f.header.grain_bytes() as usize;
    let per = f.gtes_per_gt();
    let gts = header.gt_sectors();
    let gds = header.gd_sectors();
    let io = |e| Error::io(format!("cannot write {}", tmp_path.display()), e);
    let mut before = Fragments::default();
    let mut after = Fragments::default();
    let mut next = header.overhead;
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES + gb);
    let mut batch_at = next;
    let mut grain = vec![0u8; gb];
    for index in 0..f.gd.len() {
        if f.gd[index] == 0 {
            f.no_redundant_table(index)?;
            tick()?;
            continue;
        }
        let table = f.read_checked_table(index)?;
        let mut new_table = vec![GTE_UNALLOCATED; per];
        for (j, &e) in table.iter().enumerate() {
            if e == GTE_UNALLOCATED {
                continue;
            }
            if e == GTE_ZEROED && f.header.zeroed_gte_enabled() {
                new_table[j] = GTE_ZEROED;
                continue;
            }
            let e = u64::from(e);
            let n = (index * per + j) as u64;
            f.check_grain(&meta, index, j, n, e)?;
            before.add(e, g);
            let have = (gb as u64).min(f.file_len - e * SECTOR_SIZE) as usize;
            grain[have..].fill(0);
            f.read_bytes(&mut grain[..have], e * SECTOR_SIZE)?;
            batch.extend_from_slice(&grain);
            if next + g > MAX_SPARSE_FILE_SECTORS {
                return Err(Error::new(
                    ErrorKind::FileTooBig,
                    "the rewritten file would exceed 2 TiB",
                ));
            }
            new_table[j] = next as u32;
            after.add(next, g);
            next += g;
            if batch.len() >= WRITE_BATCH_BYTES {
                out.write_all_at(&batch, batch_at * SECTOR_SIZE)
                    .map_err(io)?;
                batch_at = next;
                batch.clear();
            }
        }
        // The fresh layout preallocates table `index` right after each directory.
        let bytes: Vec<u8> = new_table.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut places = vec![header.gd_offset + gds + index as u64 * gts];
        if header.has_redundant_gd() {
            places.push(header.rgd_offset + gds + index as u64 * gts);
        }
        for p in places {
            out.write_all_at(&bytes, p * SECTOR_SIZE).map_err(io)?;
        }
        tick()?;
    }
    if !batch.is_empty() {
        out.write_all_at(&batch, batch_at * SECTOR_SIZE)
            .map_err(io)?;
    }
    out.set_len(next * SECTOR_SIZE).map_err(io)?;
    let placed = new_file.replace()?;
    Ok((before.count, after.count, placed))
}
