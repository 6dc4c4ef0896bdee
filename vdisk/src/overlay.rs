//! [`Overlay`]: an independent non-persistent view of any [`VirtualDisk`]. Writes
//! land in a private temporary file that nobody else sees and that goes away with
//! the overlay; reads take what was written from there and the rest from the disk
//! below, which is only ever read. This is what a non-persistent open of a disk
//! that is not a local chain needs (a remote export mounted by `vdisk-mount` or
//! opened through libvixDiskLib): local chains get a real redo log instead.
//!
//! The overlay file is sparse and mirrors the disk's offsets; what was written is
//! kept as a set of [`BLOCK`]-aligned byte ranges (merged, so its memory follows the
//! number of separate written stretches, not the disk's size). A write that covers
//! a block only in part first copies the rest of that block from below.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use crate::disk::{MapRange, RangeKind};
use crate::error::{Error, ErrorKind, Result};
use crate::virtual_disk::VirtualDisk;

/// The unit the overlay tracks writes in.
pub const BLOCK: u64 = 4096;

/// A set of disjoint, non-adjacent byte ranges: start -> end.
#[derive(Default, Debug)]
struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// Adds `[start, end)`, merging with touching ranges.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.0.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    /// Whether `at` is inside a range, and where that range (or the gap) ends,
    /// capped at `limit`.
    fn run_at(&self, at: u64, limit: u64) -> (bool, u64) {
        if let Some((_, &e)) = self.0.range(..=at).next_back() {
            if e > at {
                return (true, e.min(limit));
            }
        }
        let next = self.0.range(at..).next().map_or(limit, |(&s, _)| s);
        (false, next.min(limit))
    }

    fn contains_block(&self, block_start: u64) -> bool {
        self.run_at(block_start, block_start + BLOCK).0
    }
}

/// A non-persistent view of a disk (see the module documentation).
pub struct Overlay {
    base: Box<dyn VirtualDisk>,
    file: File,
    written: Mutex<RangeSet>,
    /// Writers take turns (a write that covers a block in part copies the rest of
    /// it from below first; another write into that block must not interleave).
    /// Writes to a throwaway overlay are rare next to reads, which never wait.
    fill: Mutex<()>,
}

impl Overlay {
    /// An overlay over `base`, its writes kept in an unlinked temporary file in
    /// `dir` (the system's temporary folder when `None`).
    pub fn new(base: Box<dyn VirtualDisk>, dir: Option<&Path>) -> Result<Overlay> {
        let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let file = unlinked_file(&dir)?;
        Ok(Overlay {
            base,
            file,
            written: Mutex::new(RangeSet::default()),
            fill: Mutex::new(()),
        })
    }

    /// The disk below.
    pub fn base(&self) -> &dyn VirtualDisk {
        &*self.base
    }

    /// Bytes written into the overlay so far (whole blocks).
    pub fn written_bytes(&self) -> u64 {
        self.written().0.iter().map(|(s, e)| e - s).sum()
    }

    fn written(&self) -> std::sync::MutexGuard<'_, RangeSet> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity() => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "access of {len} bytes at offset {offset} is beyond the end of the disk ({} bytes)",
                    self.capacity()
                ),
            )),
        }
    }

    fn file_read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("cannot read the overlay file", e))
    }

    fn file_write(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io("cannot write the overlay file", e))
    }

    /// Makes the block at `block_start` whole in the overlay file: copies it from
    /// below unless it was written already.
    fn fill_block(&self, block_start: u64) -> Result<()> {
        if self.written().contains_block(block_start) {
            return Ok(());
        }
        let len = BLOCK.min(self.capacity() - block_start) as usize;
        let mut b = vec![0u8; len];
        self.base.read_at(&mut b, block_start)?;
        self.file_write(&b, block_start)?;
        self.written().insert(block_start, block_start + len as u64);
        Ok(())
    }
}

/// A new file in `dir` that no name refers to (created under a random name, which
/// is removed at once): it goes away with its last handle, even after a crash.
fn unlinked_file(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    for _ in 0..16 {
        let path = dir.join(format!(".vdisk-overlay-{:016x}", crate::ids::random_u64()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io(format!("cannot unlink {}", path.display()), e))?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("cannot create an overlay file in {}", dir.display()),
                    e,
                ))
            }
        }
    }
    Err(Error::new(
        ErrorKind::AlreadyExists,
        format!("no free overlay file name in {}", dir.display()),
    ))
}

impl VirtualDisk for Overlay {
    fn capacity(&self) -> u64 {
        self.base.capacity()
    }

    fn is_writable(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let (mine, run_end) = self.written().run_at(at, end);
            let piece = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if mine {
                self.file_read(piece, at)?;
            } else {
                self.base.read_at(piece, at)?;
            }
            at = run_end;
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let first = offset / BLOCK * BLOCK;
        let last = (end - 1) / BLOCK * BLOCK;
        let partial = |b: u64| b < offset || (b + BLOCK).min(self.capacity()) > end;
        // Writers take turns: a block filled from below must not race a write
        // into the same block (reads never wait).
        let _turn = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        if partial(first) {
            self.fill_block(first)?;
        }
        if last != first && partial(last) {
            self.fill_block(last)?;
        }
        self.file_write(data, offset)?;
        let covered_end = (last + BLOCK).min(self.capacity());
        self.written().insert(first, covered_end);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, only_if_cheap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        if only_if_cheap {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "zeroing a non-persistent overlay writes zeros",
            ));
        }
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = PIECE.min(offset + len - at);
            self.write_at(&zeros[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        // Nothing to make durable: the overlay ends with the process.
        Ok(())
    }

    fn grain_bytes(&self) -> u64 {
        self.base.grain_bytes().max(BLOCK)
    }

    fn for_each_range(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(MapRange) -> Result<()>,
    ) -> Result<()> {
        let end = offset.saturating_add(len).min(self.capacity());
        let mut at = offset;
        // Pending run, merged with neighbours of the same kind and depth.
        let mut pending: Option<MapRange> = None;
        let mut push = |r: MapRange, f: &mut dyn FnMut(MapRange) -> Result<()>| -> Result<()> {
            match &mut pending {
                Some(p)
                    if p.kind == r.kind
                        && p.depth == r.depth
                        && p.offset + p.length == r.offset =>
                {
                    p.length += r.length;
                    Ok(())
                }
                _ => match pending.replace(r) {
                    Some(done) => f(done),
                    None => Ok(()),
                },
            }
        };
        while at < end {
            let (mine, run_end) = self.written().run_at(at, end);
            if mine {
                push(
                    MapRange {
                        offset: at,
                        length: run_end - at,
                        kind: RangeKind::Data,
                        depth: 0,
                    },
                    f,
                )?;
            } else {
                let mut below = Vec::new();
                self.base.for_each_range(at, run_end - at, &mut |r| {
                    below.push(MapRange {
                        depth: r.depth + 1,
                        ..r
                    });
                    Ok(())
                })?;
                for r in below {
                    push(r, f)?;
                }
            }
            at = run_end;
        }
        match pending {
            Some(p) => f(p),
            None => Ok(()),
        }
    }

    fn change_id(&self) -> Result<String> {
        self.base.change_id()
    }

    fn for_each_changed_area(
        &self,
        since: &str,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        // The overlay's writes are not the disk's changes (as with a local
        // non-persistent open).
        self.base.for_each_changed_area(since, offset, len, f)
    }

    fn describe(&self) -> String {
        format!("{} (non-persistent)", self.base.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, CreateOptions, DiskType, OpenOptions};

    fn base(dir: &Path, pattern: u8) -> Box<dyn VirtualDisk> {
        let path = dir.join("base.vmdk");
        create(
            &path,
            &CreateOptions::new(DiskType::MonolithicSparse, 4 << 20),
        )
        .unwrap();
        let d = OpenOptions::new().write(true).open(&path).unwrap();
        d.write_at(&vec![pattern; 1 << 20], 1 << 20).unwrap();
        d.close().unwrap();
        Box::new(OpenOptions::new().open(&path).unwrap())
    }

    #[test]
    fn writes_stay_in_the_overlay_and_read_back_over_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::new(base(dir.path(), 0x11), Some(dir.path())).unwrap();
        let before = std::fs::read(dir.path().join("base.vmdk")).unwrap();
        let mut model = vec![0u8; 4 << 20];
        model[1 << 20..2 << 20].fill(0x11);
        // Unaligned writes across block edges, inside and outside the base's data.
        for (off, len, v) in [
            (100u64, 10usize, 1u8),
            ((1 << 20) - 7, 20, 2),
            (3 * 4096 + 1, 3 * 4096, 3),
            ((4 << 20) - 5, 5, 4),
            (0, 4096, 5),
        ] {
            o.write_at(&vec![v; len], off).unwrap();
            model[off as usize..off as usize + len].fill(v);
        }
        let mut all = vec![0u8; 4 << 20];
        o.read_at(&mut all, 0).unwrap();
        assert!(
            all == model,
            "the overlay reads what was written over the base"
        );
        // Reads at odd offsets cross overlay and base runs.
        let mut piece = vec![0u8; 9000];
        o.read_at(&mut piece, (1 << 20) - 4000).unwrap();
        assert_eq!(piece, model[(1 << 20) - 4000..(1 << 20) + 5000]);
        o.write_zeroes(1 << 20, 8192, false).unwrap();
        model[1 << 20..(1 << 20) + 8192].fill(0);
        o.read_at(&mut all, 0).unwrap();
        assert!(all == model);
        assert!(o.write_zeroes(0, 4096, true).is_err());
        // The map: written blocks are data at depth 0, the base's below at depth 1.
        let mut runs = Vec::new();
        o.for_each_range(0, 4 << 20, &mut |r| {
            runs.push(r);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            runs.first().map(|r| (r.offset, r.kind, r.depth)),
            Some((0, RangeKind::Data, 0))
        );
        let mut at = 0;
        for r in &runs {
            assert_eq!(r.offset, at, "runs cover the disk without gaps");
            at += r.length;
        }
        assert_eq!(at, 4 << 20);
        assert!(runs
            .iter()
            .any(|r| r.depth == 1 && r.kind == RangeKind::Data));
        assert!(o.written_bytes() >= 5 * 4096);
        assert!(o.write_at(&[1], 4 << 20).is_err());
        let mut b = [0u8; 2];
        assert!(o.read_at(&mut b, (4 << 20) - 1).is_err());
        drop(o);
        assert!(
            std::fs::read(dir.path().join("base.vmdk")).unwrap() == before,
            "the base disk's file never changes"
        );
    }

    #[test]
    fn the_written_set_merges_and_answers_runs() {
        let mut s = RangeSet::default();
        s.insert(8192, 12288);
        s.insert(0, 4096);
        s.insert(4096, 8192);
        assert_eq!(s.0.len(), 1);
        assert_eq!(s.run_at(100, 1 << 20), (true, 12288));
        assert_eq!(s.run_at(12288, 1 << 20), (false, 1 << 20));
        s.insert(20480, 24576);
        assert_eq!(s.run_at(12288, 1 << 20), (false, 20480));
        s.insert(0, 30000);
        assert_eq!(s.0.len(), 1);
    }
}
