//! Converting between raw images and VMDK disks of any writable type, copying only
//! what holds data. Worker threads each read a chunk, skip its all-zero blocks and
//! write the rest, one chunk buffer per worker (bounded memory).
//!
//! The destination is built in a hidden folder beside it (`.vdisk-convert-RANDOM`,
//! see [`Staging`]) under its final file names, and moved into place only when it is
//! complete: the extent files first, the descriptor (or the one file of a
//! monolithic disk or raw image) last. An interrupted conversion therefore never
//! leaves a file under the destination's name; a killed one leaves the hidden folder.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::disk::{Disk, OpenOptions, RangeKind};
use crate::error::{Error, ErrorKind, Result};
use crate::ops::create::{create, start_stream, CreateOptions};
use crate::ops::stream_writer::{compress_grain, StreamWriter};
use crate::storage::{FileStorage, LockMode, Storage};
use crate::virtual_disk::VirtualDisk;
use std::collections::BTreeMap;

/// Bytes read per chunk.
const CHUNK: usize = 1 << 20;
/// Granularity of zero detection (one grain of a default sparse extent).
const BLOCK: usize = 64 << 10;
/// zlib level of streamOptimized output unless chosen (zlib's own default).
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 6;
/// Most worker threads of one conversion.
const MAX_WORKERS: usize = 4;
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

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// What to create for a VMDK destination (the capacity is taken from the source).
    pub target: CreateOptions,
    /// fsync the destination before returning. Off by default, like `qemu-img
    /// convert` (its destination cache mode is `unsafe`): the output is complete in
    /// the host's page cache and reaches the disk with normal write-back.
    pub sync: bool,
    /// zlib level (0-9) of streamOptimized destinations.
    pub compression_level: u32,
}

impl ConvertOptions {
    /// Convert into `disk_type` (for VMDK destinations), no final fsync.
    pub fn new(disk_type: crate::DiskType) -> ConvertOptions {
        ConvertOptions {
            target: CreateOptions::new(disk_type, 0),
            sync: false,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
        }
    }
}

/// Progress callback: `(bytes done, bytes total)`; return `false` to cancel.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

enum Source<'a> {
    Raw(FileStorage, u64),
    Disk(Disk),
    Virtual(&'a dyn VirtualDisk),
}

impl Source<'_> {
    fn capacity(&self) -> u64 {
        match self {
            Source::Raw(_, len) => *len,
            Source::Disk(d) => d.capacity(),
            Source::Virtual(d) => d.capacity(),
        }
    }

    /// Calls `f(start, len)` for each range of `[offset, offset+len)` that may hold
    /// data, in order (streamed: the map of a window is never held whole).
    fn for_each_data_range(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64),
    ) -> Result<()> {
        match self {
            Source::Raw(s, _) => crate::storage::for_each_data(s, offset, len, |start, n| {
                f(start, n);
                Ok(())
            }),
            Source::Disk(d) => d.for_each_range(offset, len, |r| {
                if r.kind == RangeKind::Data {
                    f(r.offset, r.length);
                }
                Ok(())
            }),
            Source::Virtual(d) => d.for_each_range(offset, len, &mut |r| {
                if r.kind == RangeKind::Data {
                    f(r.offset, r.length);
                }
                Ok(())
            }),
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
            Source::Virtual(d) => d.read_at(buf, offset),
        }
    }
}

enum Sink {
    Raw(FileStorage),
    Disk(Disk),
    Stream(Box<Mutex<StreamSink>>),
}

/// The ordering stage in front of a stream writer: workers compress their chunks in
/// parallel and hand them in with their sequence number; chunks are appended in order.
/// Each worker commits its chunk before taking another, so at most one chunk per
/// worker waits here.
struct StreamSink {
    writer: StreamWriter,
    next_seq: u64,
    pending: BTreeMap<u64, Vec<(u64, Vec<u8>)>>,
}

impl StreamSink {
    fn commit(&mut self, seq: u64, grains: Vec<(u64, Vec<u8>)>) -> Result<u64> {
        self.pending.insert(seq, grains);
        let mut written = 0u64;
        while let Some(grains) = self.pending.remove(&self.next_seq) {
            for (grain, data) in grains {
                written += data.len() as u64;
                self.writer.append_grain(grain, &data)?;
            }
            self.next_seq += 1;
        }
        Ok(written)
    }
}

impl Sink {
    fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        match self {
            Sink::Raw(s) => s
                .write_all_at(data, offset)
                .map_err(|e| Error::io(format!("cannot write {}", s.path().display()), e)),
            Sink::Disk(d) => d.write_at(data, offset),
            Sink::Stream(_) => Err(Error::new(
                ErrorKind::Fail,
                "stream sinks take whole chunks",
            )),
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Sink::Raw(s) => s
                .sync()
                .map_err(|e| Error::io(format!("cannot sync {}", s.path().display()), e)),
            Sink::Disk(d) => d.close(),
            Sink::Stream(s) => {
                let s = s
                    .into_inner()
                    .map_err(|_| Error::new(ErrorKind::Fail, "stream sink poisoned"))?;
                if !s.pending.is_empty() {
                    return Err(Error::new(ErrorKind::Fail, "stream chunks left unwritten"));
                }
                s.writer.finish()
            }
        }
    }
}

pub use crate::zeros::is_zero;

/// Converts `src` (of format `src_format`) into a new `dst`. Only ranges holding
/// data are read, and blocks of zeros are not written. The destination is built
/// under temporary names and renamed into place when complete (see [`Staging`]): on
/// failure (or a crash) no file exists under its name.
pub fn convert(
    src: &Path,
    src_format: ImageFormat,
    dst: &Path,
    dst_format: ImageFormat,
    opts: &ConvertOptions,
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
    convert_source(&source, dst, dst_format, opts, progress)
}

/// Converts an open disk - local or remote - into a new `dst`, as [`convert`] does.
pub fn convert_from(
    src: &dyn VirtualDisk,
    dst: &Path,
    dst_format: ImageFormat,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertStats> {
    convert_source(&Source::Virtual(src), dst, dst_format, opts, progress)
}

fn convert_source(
    source: &Source<'_>,
    dst: &Path,
    dst_format: ImageFormat,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertStats> {
    let capacity = source.capacity();
    if dst.symlink_metadata().is_ok() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("destination {} already exists", dst.display()),
        ));
    }
    if dst_format == ImageFormat::Vmdk && capacity == 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "the source is empty",
        ));
    }
    let staging = Staging::new(dst)?;
    let staged = staging.path();
    let staged = staged.as_path();
    let sink = match dst_format {
        ImageFormat::Raw => {
            let f = FsOpenOptions::new()
                .write(true)
                .create_new(true)
                .open(staged)
                .map_err(|e| Error::io(format!("cannot create {}", staged.display()), e))?;
            drop(f);
            let mut s = FileStorage::open(staged, true, LockMode::Exclusive)?;
            s.set_sync(opts.sync);
            s.set_len(capacity)
                .map_err(|e| Error::io(format!("cannot size {}", staged.display()), e))?;
            Sink::Raw(s)
        }
        ImageFormat::Vmdk => {
            let create_opts = CreateOptions {
                capacity,
                ..opts.target.clone()
            };
            if create_opts.disk_type == crate::DiskType::StreamOptimized {
                let mut writer = start_stream(staged, &create_opts)?;
                writer.set_sync(opts.sync);
                Sink::Stream(Box::new(Mutex::new(StreamSink {
                    writer,
                    next_seq: 0,
                    pending: BTreeMap::new(),
                })))
            } else {
                create(staged, &create_opts).map_err(|e| e.within(dst.display()))?;
                Sink::Disk(
                    OpenOptions::new()
                        .write(true)
                        .sync(opts.sync)
                        .open(staged)?,
                )
            }
        }
    };
    // Every file the destination will have exists now: one already taken refuses
    // the conversion before any data is copied.
    staging.check_free()?;
    let stats = copy(source, &sink, capacity, opts.compression_level, progress)?;
    sink.finish()?;
    staging.publish(opts.sync)?;
    Ok(stats)
}

/// A destination under construction: a hidden folder created beside it
/// (`.vdisk-convert-` and 16 random hex digits, so a retry never meets a leftover
/// of an earlier run), in which the destination is made under its final name, so
/// names inside it (extent lines) are already right. [`Staging::publish`] moves its
/// files into the destination's folder, each by a rename that never replaces a
/// file: the extent files first, the file named like the destination (descriptor,
/// monolithic file, raw image) last, so that nothing looks whole before everything
/// is there. Dropped unpublished (an error, a cancel, a panic), it removes itself;
/// only a killed process leaves it behind, or, killed during the renames, extent
/// files already moved (no descriptor names them).
struct Staging {
    /// The hidden folder.
    dir: PathBuf,
    /// The destination's folder.
    target_dir: PathBuf,
    /// The destination's file name.
    name: std::ffi::OsString,
}

impl Staging {
    fn new(dst: &Path) -> Result<Staging> {
        let name = dst.file_name().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("{} is not a usable file name", dst.display()),
            )
        })?;
        let target_dir = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = target_dir.join(format!(".vdisk-convert-{:016x}", crate::ids::random_u64()));
        std::fs::create_dir(&dir).map_err(|e| {
            Error::io(
                format!("cannot create the temporary folder {}", dir.display()),
                e,
            )
        })?;
        Ok(Staging {
            dir,
            target_dir,
            name: name.to_os_string(),
        })
    }

    /// Where the destination is built.
    fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// The files built so far, the one named like the destination last.
    fn files(&self) -> Result<Vec<std::ffi::OsString>> {
        let io = |e| Error::io(format!("cannot list {}", self.dir.display()), e);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            names.push(entry.map_err(io)?.file_name());
        }
        names.sort_by_key(|n| *n == self.name);
        Ok(names)
    }

    /// Refuses (`AlreadyExists`) if a file the destination will have is taken.
    fn check_free(&self) -> Result<()> {
        for name in self.files()? {
            let there = self.target_dir.join(&name);
            if there.symlink_metadata().is_ok() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} already exists", there.display()),
                ));
            }
        }
        Ok(())
    }

    /// Moves the finished destination into place (see [`Staging`]); with `sync`,
    /// the folder is synced so that the names are durable.
    fn publish(self, sync: bool) -> Result<()> {
        let mut moved: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for name in self.files()? {
                let to = self.target_dir.join(&name);
                move_new(&self.dir.join(&name), &to)?;
                moved.push(to);
            }
            if sync {
                std::fs::File::open(&self.target_dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| {
                        Error::io(format!("cannot sync {}", self.target_dir.display()), e)
                    })?;
            }
            Ok(())
        })();
        if result.is_err() {
            // What was moved is this conversion's own, incomplete destination.
            for p in &moved {
                let _ = std::fs::remove_file(p);
            }
        }
        result
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Renames `from` to `to`, refusing (`AlreadyExists`) to replace a file: a hard link
/// under the new name (which fails if it is taken), then the old name removed. On a
/// file system without hard links, a check then a rename.
fn move_new(from: &Path, to: &Path) -> Result<()> {
    let taken = || {
        Error::new(
            ErrorKind::AlreadyExists,
            format!("{} already exists", to.display()),
        )
    };
    let failed = |e| {
        Error::io(
            format!("cannot move {} to {}", from.display(), to.display()),
            e,
        )
    };
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from).map_err(failed),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(taken()),
        Err(_) => {
            if to.symlink_metadata().is_ok() {
                return Err(taken());
            }
            std::fs::rename(from, to).map_err(failed)
        }
    }
}

/// Hands out chunks of the source's data ranges to the workers, a window of the
/// allocation map at a time.
struct ChunkCursor<'a> {
    source: &'a Source<'a>,
    capacity: u64,
    window: u64,
    ranges: std::collections::VecDeque<(u64, u64)>,
    seq: u64,
}

impl ChunkCursor<'_> {
    /// The next chunk `(sequence number, offset, len)`, in ascending offsets, aligned
    /// to chunks, so that zero detection (and stream grains) follow the grain grid.
    fn next(&mut self) -> Result<Option<(u64, u64, usize)>> {
        loop {
            if let Some((start, len)) = self.ranges.front_mut() {
                let aligned_end = ((*start / CHUNK as u64) + 1) * CHUNK as u64;
                let n = aligned_end.min(*start + *len) - *start;
                let chunk = (self.seq, *start, n as usize);
                self.seq += 1;
                *start += n;
                *len -= n;
                if *len == 0 {
                    self.ranges.pop_front();
                }
                return Ok(Some(chunk));
            }
            if self.window >= self.capacity {
                return Ok(None);
            }
            let wlen = MAP_WINDOW.min(self.capacity - self.window);
            // Widen ranges to whole blocks (merging neighbours): a grain of the
            // destination is then never split between two chunks, and a window holds
            // at most one range per block.
            let block = BLOCK as u64;
            let capacity = self.capacity;
            let ranges = &mut self.ranges;
            self.source
                .for_each_data_range(self.window, wlen, |start, len| {
                    let s = start / block * block;
                    let e = (start + len)
                        .div_ceil(block)
                        .saturating_mul(block)
                        .min(capacity);
                    match ranges.back_mut() {
                        Some((ps, pl)) if *ps + *pl >= s => *pl = e.max(*ps + *pl) - *ps,
                        _ => ranges.push_back((s, e - s)),
                    }
                })?;
            self.window += wlen;
        }
    }
}

fn copy(
    source: &Source<'_>,
    sink: &Sink,
    capacity: u64,
    level: u32,
    progress: Progress<'_>,
) -> Result<ConvertStats> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, MAX_WORKERS);
    let cursor = Mutex::new(ChunkCursor {
        source,
        capacity,
        window: 0,
        ranges: Default::default(),
        seq: 0,
    });
    let done = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    if !progress(0, capacity) {
        return Err(Error::new(ErrorKind::Cancelled, "conversion cancelled"));
    }
    // Each worker takes a chunk, reads it, finds its non-zero blocks and writes them;
    // source and sink do positional I/O, so workers only share the cursor.
    // `step` copies one chunk; Ok(false) when there is none left.
    let step = |buf: &mut [u8]| -> Result<bool> {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let next = cursor
            .lock()
            .map_err(|_| Error::new(ErrorKind::Fail, "chunk cursor poisoned"))?
            .next()?;
        let Some((seq, offset, len)) = next else {
            return Ok(false);
        };
        let data = &mut buf[..len];
        source.read(data, offset)?;
        let runs = nonzero_runs(data, offset);
        if let Sink::Stream(stream) = sink {
            // Compress here, in parallel with the other workers; append in order.
            let mut grains = Vec::new();
            for (start, n) in runs {
                // Runs start on the block grid (chunks are block-aligned).
                for (k, piece) in data[start..start + n].chunks(BLOCK).enumerate() {
                    let at = offset + (start + k * BLOCK) as u64;
                    grains.push((at / BLOCK as u64, compress_grain(piece, level)?));
                }
            }
            let n = stream
                .lock()
                .map_err(|_| Error::new(ErrorKind::Fail, "stream sink poisoned"))?
                .commit(seq, grains)?;
            written.fetch_add(n, Ordering::Relaxed);
        } else {
            for (start, n) in runs {
                sink.write(&data[start..start + n], offset + start as u64)?;
                written.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        done.fetch_add(len as u64, Ordering::Relaxed);
        Ok(true)
    };
    let work = || -> Result<()> {
        let mut buf = vec![0u8; CHUNK];
        let r = (|| {
            while step(&mut buf)? {}
            Ok(())
        })();
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        r
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers).map(|_| scope.spawn(work)).collect();
        let mut result = Ok(());
        let mut cancelled = false;
        let progress_done = |p: Progress<'_>, cancelled: &mut bool| {
            if !p(done.load(Ordering::Relaxed), capacity) {
                *cancelled = true;
                stop.store(true, Ordering::Relaxed);
            }
        };
        // The calling thread copies chunks too, reporting progress after each.
        let mut buf = vec![0u8; CHUNK];
        loop {
            match step(&mut buf) {
                Ok(true) => progress_done(progress, &mut cancelled),
                Ok(false) => break,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    result = Err(e);
                    break;
                }
            }
        }
        for h in helpers {
            let r = h
                .join()
                .map_err(|_| Error::new(ErrorKind::Fail, "conversion worker panicked"))
                .and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        if cancelled {
            return Err(Error::new(ErrorKind::Cancelled, "conversion cancelled"));
        }
        result?;
        progress_done(progress, &mut cancelled);
        Ok(ConvertStats {
            capacity,
            written: written.load(Ordering::Relaxed),
        })
    })
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
