//! Backups as streamOptimized disks: a full backup holds every area of the source
//! that holds data; an incremental backup is a streamOptimized *child* of the
//! previous backup holding only the areas that changed, so the chain
//! `full <- incr1 <- incr2 ...` opened at its top reads as the source did at the last
//! backup, in any VMDK reader that follows parents (ours, qemu).

use std::path::Path;

use crate::disk::Disk;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::create::{extent, new_ddb, DEFAULT_HW_VERSION};
use crate::ops::stream_writer::{compress_grain, StreamWriter, STREAM_GRAIN_SECTORS};
use crate::virtual_disk::VirtualDisk;
use crate::{descriptor::Descriptor, descriptor::ExtentKind, ids, DiskType};
use crate::{limits::SECTOR_SIZE, AdapterType};

/// Bytes per grain of the backup files.
const GRAIN: u64 = STREAM_GRAIN_SECTORS * SECTOR_SIZE;
/// Grains read and compressed per batch (bounds memory: 4 MiB of data).
const BATCH_GRAINS: usize = 64;
/// zlib level of backups: fast, as backups are written under time pressure.
pub const BACKUP_COMPRESSION_LEVEL: u32 = 1;
/// Most threads compressing one batch.
const MAX_THREADS: usize = 4;

/// A grain index and its zlib data.
type CompressedGrain = (u64, Vec<u8>);

/// What a backup wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// Bytes of the source copied (whole grains covering the areas).
    pub bytes_read: u64,
    /// Grains written into the backup file.
    pub grains: u64,
    /// Size of the backup file.
    pub file_bytes: u64,
}

/// Writes `areas` (sorted `(offset, length)` byte ranges of `src`, as
/// [`Disk::changed_areas`] gives them) into a new streamOptimized disk `dst`. With
/// `parent` (the previous backup), `dst` is its child: areas not written read
/// through to it. Without, `dst` is a full backup and grains holding only zeros are
/// left out. `progress(done, total)` is called with bytes; returning `false` cancels
/// (the partial file is removed).
pub fn write_backup(
    src: &dyn VirtualDisk,
    areas: &[(u64, u64)],
    dst: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<BackupStats> {
    // The stream is written under a temporary name that takes `dst` only once it is
    // complete (and is removed otherwise): nothing to clean up here, and a `dst`
    // that already exists is refused, not deleted.
    write_inner(src, areas, dst, parent, progress).map_err(|e| e.within(dst.display()))
}

/// The grains covering `areas`, ascending, each once.
fn grains_of(areas: &[(u64, u64)], capacity: u64) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = Vec::new();
    let mut last_end = 0;
    for &(off, len) in areas {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= capacity)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("area at {off} (+{len}) is outside the disk"),
                )
            })?;
        if off < last_end {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "backup areas must be sorted and must not overlap",
            ));
        }
        last_end = end;
        if len == 0 {
            continue;
        }
        for g in off / GRAIN..=(end - 1) / GRAIN {
            if out.last() != Some(&g) {
                out.push(g);
            }
        }
    }
    Ok(out)
}

fn write_inner(
    src: &dyn VirtualDisk,
    areas: &[(u64, u64)],
    dst: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<BackupStats> {
    let capacity = src.capacity();
    let grains = grains_of(areas, capacity)?;
    let name = dst.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{} is not a usable file name", dst.display()),
        )
    })?;
    let (parent_cid, hint) = match parent {
        Some(p) => {
            let pd = Disk::open(p)?;
            if pd.capacity() != capacity {
                return Err(Error::new(
                    ErrorKind::CapacityMismatch,
                    format!(
                        "the previous backup {} holds {} bytes, the disk {}",
                        p.display(),
                        pd.capacity(),
                        capacity
                    ),
                ));
            }
            let dir = dst.parent().unwrap_or(Path::new("."));
            (pd.cid()?, Some(crate::ops::child::relative_name(dir, p)))
        }
        None => (ids::CID_NO_PARENT, None),
    };
    let sectors = capacity.div_ceil(SECTOR_SIZE);
    let cid = ids::new_cid();
    let ddb = new_ddb(sectors, AdapterType::LsiLogic, DEFAULT_HW_VERSION, cid);
    let ddb_refs: Vec<(&str, &str)> = ddb.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let descriptor = Descriptor::new(
        &DiskType::StreamOptimized.create_type(),
        cid,
        parent_cid,
        hint.as_deref(),
        &[extent(sectors, ExtentKind::Sparse, name, None)],
        &ddb_refs,
    );
    let mut w = StreamWriter::create(dst, capacity, &descriptor.to_bytes())?;
    let total = grains.len() as u64 * GRAIN;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS);
    let mut stats = BackupStats::default();
    let mut buf = vec![0u8; BATCH_GRAINS * GRAIN as usize];
    for batch in grains.chunks(BATCH_GRAINS) {
        // Read the batch's grains (the last grain of the disk may be short).
        let mut pieces: Vec<(u64, usize, usize)> = Vec::with_capacity(batch.len());
        let mut used = 0usize;
        for &g in batch {
            let off = g * GRAIN;
            let len = (capacity - off).min(GRAIN) as usize;
            src.read_at(&mut buf[used..used + len], off)?;
            pieces.push((g, used, len));
            used += len;
        }
        let data = &buf[..used];
        let work: Vec<(u64, &[u8])> = pieces
            .iter()
            .map(|&(g, at, len)| (g, &data[at..at + len]))
            .filter(|(_, d)| parent.is_some() || d.iter().any(|&b| b != 0))
            .collect();
        let per = work.len().div_ceil(threads).max(1);
        let compressed: Vec<Result<Vec<CompressedGrain>>> = std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|&(g, d)| Ok((g, compress_grain(d, BACKUP_COMPRESSION_LEVEL)?)))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::new(ErrorKind::Fail, "a compression thread panicked"))
                    })
                })
                .collect()
        });
        for part in compressed {
            for (g, z) in part? {
                w.append_grain(g, &z)?;
                stats.grains += 1;
            }
        }
        stats.bytes_read += used as u64;
        if !progress(stats.bytes_read, total) {
            return Err(Error::new(ErrorKind::Cancelled, "backup cancelled"));
        }
    }
    w.finish()?;
    stats.file_bytes = std::fs::metadata(dst)
        .map_err(|e| Error::io(format!("cannot stat {}", dst.display()), e))?
        .len();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grains_cover_areas_once_and_bad_areas_are_refused() {
        let areas = [(0, 1), (100, 65536), (200_000, 10)];
        assert_eq!(grains_of(&areas, 1 << 20).unwrap(), vec![0, 1, 3]);
        assert!(grains_of(&[(10, 5), (0, 5)], 1 << 20).is_err());
        assert!(grains_of(&[(1 << 20, 1)], 1 << 20).is_err());
        assert!(grains_of(&[(u64::MAX, 2)], 1 << 20).is_err());
    }

    #[test]
    fn a_backup_onto_an_existing_file_is_refused_and_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.vmdk");
        crate::create(
            &src,
            &crate::CreateOptions::new(DiskType::MonolithicSparse, 1 << 20),
        )
        .unwrap();
        let disk = crate::Disk::open(&src).unwrap();
        let dst = dir.path().join("backup.vmdk");
        std::fs::write(&dst, b"not ours").unwrap();
        let e = write_backup(&disk, &[(0, 1 << 20)], &dst, None, &mut |_, _| true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"not ours");
        // Cancelled: no file, not even a temporary one.
        let other = dir.path().join("other.vmdk");
        let e = write_backup(&disk, &[(0, 1 << 20)], &other, None, &mut |_, _| false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cancelled);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["backup.vmdk", "src.vmdk"]);
    }
}
