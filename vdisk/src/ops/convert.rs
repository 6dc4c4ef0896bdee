//! Converting between raw images and VMDK disks of any writable type, copying only
//! what holds data. A reader thread reads and finds all-zero blocks while a writer
//! thread writes, with a fixed number of buffers in flight (bounded memory).

use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use crate::disk::{Disk, OpenOptions, RangeKind};
use crate::error::{Error, ErrorKind, Result};
use crate::ops::create::{create, CreateOptions};
use crate::storage::{FileStorage, LockMode, Storage};

/// Bytes read per chunk.
const CHUNK: usize = 4 << 20;
/// Granularity of zero detection (one grain of a default sparse extent).
const BLOCK: usize = 64 << 10;
/// Buffers in flight between reader and writer.
const BUFFERS: usize = 4;
/// How much of the allocation map is held at once (bounds memory on huge disks).
const MAP_WINDOW: u64 = 1 << 30;

/// Format of a convert source or destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// A raw image: the guest bytes, nothing else.
    Raw,
    /// A VMDK disk.
    Vmdk,
}

/// What a conversion did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Bytes of data written to the destination (zeros are skipped).
    pub written: u64,
}

/// Progress callback: `(bytes done, bytes total)`; return `false` to cancel.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

enum Source {
    Raw(FileStorage, u64),
    Disk(Disk),
}

impl Source {
    fn capacity(&self) -> u64 {
        match self {
            Source::Raw(_, len) => *len,
            Source::Disk(d) => d.capacity(),
        }
    }

    /// Ranges of `[offset, offset+len)` that may hold data.
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        match self {
            Source::Raw(..) => Ok(vec![(offset, len)]),
            Source::Disk(d) => Ok(d
                .allocation_map(offset, len)?
                .into_iter()
                .filter(|r| r.kind == RangeKind::Data)
                .map(|r| (r.offset, r.length))
                .collect()),
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Source::Raw(s, _) => {
                // The tail of a raw image that is not a sector multiple reads as zeros.
                let mut done = 0;
                while done < buf.len() {
                    let n = s
                        .read_at(&mut buf[done..], offset + done as u64)
                        .map_err(|e| Error::io(format!("cannot read {}", s.path().display()), e))?;
                    if n == 0 {
                        buf[done..].fill(0);
                        break;
                    }
                    done += n;
                }
                Ok(())
            }
            Source::Disk(d) => d.read_at(buf, offset),
        }
    }
}

enum Sink {
    Raw(FileStorage),
    Disk(Disk),
}

impl Sink {
    fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        match self {
            Sink::Raw(s) => s
                .write_all_at(data, offset)
                .map_err(|e| Error::io(format!("cannot write {}", s.path().display()), e)),
            Sink::Disk(d) => d.write_at(data, offset),
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Sink::Raw(s) => s
                .sync()
                .map_err(|e| Error::io(format!("cannot sync {}", s.path().display()), e)),
            Sink::Disk(d) => d.close(),
        }
    }
}

/// Whether `block` is all zeros (vectorisable: no early exit inside 256-byte runs).
pub fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Converts `src` (of format `src_format`) into a new `dst`. For a VMDK destination
/// `target` says what to create (its capacity is taken from the source). Only
/// ranges holding data are read, and blocks of zeros are not written.
pub fn convert(
    src: &Path,
    src_format: ImageFormat,
    dst: &Path,
    dst_format: ImageFormat,
    target: &CreateOptions,
    progress: Progress<'_>,
) -> Result<ConvertStats> {
    let source = match src_format {
        ImageFormat::Raw => {
            let s = FileStorage::open(src, false, LockMode::Shared)?;
            let len = s
                .len()
                .map_err(|e| Error::io(format!("cannot read size of {}", src.display()), e))?;
            Source::Raw(s, len.div_ceil(512) * 512)
        }
        ImageFormat::Vmdk => Source::Disk(Disk::open(src)?),
    };
    let capacity = source.capacity();
    if dst.exists() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("destination {} already exists", dst.display()),
        ));
    }
    let sink = match dst_format {
        ImageFormat::Raw => {
            let f = FsOpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)
                .map_err(|e| Error::io(format!("cannot create {}", dst.display()), e))?;
            drop(f);
            let s = FileStorage::open(dst, true, LockMode::Exclusive)?;
            s.set_len(capacity)
                .map_err(|e| Error::io(format!("cannot size {}", dst.display()), e))?;
            Sink::Raw(s)
        }
        ImageFormat::Vmdk => {
            if capacity == 0 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "the source is empty",
                ));
            }
            let opts = CreateOptions {
                capacity,
                ..target.clone()
            };
            create(dst, &opts)?;
            Sink::Disk(OpenOptions::new().write(true).open(dst)?)
        }
    };
    let result = copy(&source, &sink, capacity, progress).and_then(|stats| {
        sink.finish()?;
        Ok(stats)
    });
    if result.is_err() {
        remove_output(dst, dst_format);
    }
    result
}

/// Best-effort removal of a half-written destination.
fn remove_output(dst: &Path, format: ImageFormat) {
    if format == ImageFormat::Vmdk {
        if let Ok(d) = Disk::open(dst) {
            let files: Vec<_> = d.links()[0]
                .extents()
                .iter()
                .filter_map(|e| e.path.clone())
                .collect();
            drop(d);
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    let _ = std::fs::remove_file(dst);
}

/// A chunk read by the reader: where it goes, the buffer, and its non-zero runs.
struct Chunk {
    offset: u64,
    buf: Vec<u8>,
    len: usize,
    runs: Vec<(usize, usize)>,
}

fn copy(
    source: &Source,
    sink: &Sink,
    capacity: u64,
    progress: Progress<'_>,
) -> Result<ConvertStats> {
    let (full_tx, full_rx) = sync_channel::<Chunk>(BUFFERS);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_chunks(source, capacity, &full_tx, &empty_rx));
        let written = write_chunks(sink, capacity, &full_rx, &empty_tx, progress);
        // Unblock the reader if the writer stopped early.
        drop(full_rx);
        drop(empty_tx);
        let read = reader
            .join()
            .map_err(|_| Error::new(ErrorKind::Fail, "reader thread panicked"))?;
        let written = written?;
        read?;
        Ok(ConvertStats { capacity, written })
    })
}

fn read_chunks(
    source: &Source,
    capacity: u64,
    out: &SyncSender<Chunk>,
    free: &Receiver<Vec<u8>>,
) -> Result<()> {
    let mut window = 0u64;
    while window < capacity {
        let wlen = MAP_WINDOW.min(capacity - window);
        for (start, len) in source.data_ranges(window, wlen)? {
            let mut pos = start;
            let end = start + len;
            while pos < end {
                // Keep chunks block-aligned so zero detection matches grains.
                let aligned_end = ((pos / CHUNK as u64) + 1) * CHUNK as u64;
                let n = (aligned_end.min(end) - pos) as usize;
                let Ok(mut buf) = free.recv() else {
                    return Ok(()); // writer gave up; its error is reported
                };
                source.read(&mut buf[..n], pos)?;
                let runs = nonzero_runs(&buf[..n], pos);
                if out
                    .send(Chunk {
                        offset: pos,
                        buf,
                        len: n,
                        runs,
                    })
                    .is_err()
                {
                    return Ok(());
                }
                pos += n as u64;
            }
        }
        window += wlen;
    }
    Ok(())
}

/// Runs of non-zero blocks in `buf` (which starts at disk offset `offset`), merged.
fn nonzero_runs(buf: &[u8], offset: u64) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        // Block boundaries follow the disk's grid, not the buffer's.
        let to_boundary = BLOCK - ((offset as usize + pos) % BLOCK);
        let n = to_boundary.min(buf.len() - pos);
        if !is_zero(&buf[pos..pos + n]) {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == pos => *l += n,
                _ => runs.push((pos, n)),
            }
        }
        pos += n;
    }
    runs
}

fn write_chunks(
    sink: &Sink,
    capacity: u64,
    input: &Receiver<Chunk>,
    free: &SyncSender<Vec<u8>>,
    progress: Progress<'_>,
) -> Result<u64> {
    let mut written = 0u64;
    if !progress(0, capacity) {
        return Err(Error::new(ErrorKind::Cancelled, "conversion cancelled"));
    }
    while let Ok(chunk) = input.recv() {
        for &(start, len) in &chunk.runs {
            sink.write(&chunk.buf[start..start + len], chunk.offset + start as u64)?;
            written += len as u64;
        }
        let done = chunk.offset + chunk.len as u64;
        let _ = free.send(chunk.buf);
        if !progress(done, capacity) {
            return Err(Error::new(ErrorKind::Cancelled, "conversion cancelled"));
        }
    }
    progress(capacity, capacity);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 1000];
        assert!(is_zero(&b));
        b[999] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn runs_follow_the_disk_grid_and_merge() {
        let mut b = vec![0u8; 3 * BLOCK];
        b[BLOCK + 5] = 1;
        b[2 * BLOCK] = 1;
        assert_eq!(nonzero_runs(&b, 0), vec![(BLOCK, 2 * BLOCK)]);
        // Starting half a block in: first piece is half a block.
        let mut b = vec![0u8; BLOCK];
        b[BLOCK / 2] = 1;
        assert_eq!(
            nonzero_runs(&b, (BLOCK / 2) as u64),
            vec![(BLOCK / 2, BLOCK / 2)]
        );
    }
}
