//! The append-only streamOptimized writer, laid out as the specification says: header
//! (with `gdOffset = GD_AT_END`) and embedded descriptor, then for each grain in
//! ascending order a grain marker with its zlib data, a grain-table marker and table
//! after the grains of every non-empty table, the grain-directory marker and
//! directory, the footer marker and footer (the header with the real directory
//! offset), and the end-of-stream marker.

use std::cell::RefCell;
use std::path::Path;

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::header::{
    SparseHeader, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_VALID_NEWLINE, GD_AT_END,
};
use crate::limits::SECTOR_SIZE;
use crate::ops::create::refuse_existing;
use crate::replace::NewFile;
use crate::storage::{LockMode, Storage};

/// Grain size of streams we write (sectors).
pub const STREAM_GRAIN_SECTORS: u64 = 128;
/// Sectors reserved for the embedded descriptor.
const DESCRIPTOR_SECTORS: u64 = 20;
/// Metadata marker types.
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;
/// Bytes buffered before a write.
const WRITE_BUFFER: usize = 4 << 20;

/// Bytes of a grain test-compressed to judge whether it compresses at all.
const SAMPLE: usize = 4096;

/// Compresses one grain with zlib at `level` (0-9). A grain whose first 4 KiB do not
/// shrink at level 1 (random or already compressed data) is stored (level 0) instead:
/// the output is as small, and deflate's match search on such data is pure cost.
pub fn compress_grain(data: &[u8], level: u32) -> Result<Vec<u8>> {
    let level = if level > 0 && data.len() >= 2 * SAMPLE && !compresses(&data[..SAMPLE]) {
        0
    } else {
        level
    };
    // Room for deflate's worst case (stored blocks: 5 bytes per 64 KiB) and more.
    let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 64);
    match with_compressor(level, |c| {
        c.compress_vec(data, &mut out, FlushCompress::Finish)
    }) {
        Ok(Status::StreamEnd) => Ok(out),
        Ok(_) => Err(Error::new(
            ErrorKind::Fail,
            "zlib output did not fit its buffer",
        )),
        Err(e) => Err(Error::new(
            ErrorKind::Fail,
            format!("zlib compression failed: {e}"),
        )),
    }
}

thread_local! {
    /// Each thread's compressors, one per level, reset between grains: a new one
    /// allocates and clears some 300 KiB of zlib state, per 64 KiB grain.
    static COMPRESSORS: RefCell<[Option<Compress>; 10]> = RefCell::new(Default::default());
}

/// Runs `f` with this thread's zlib compressor of `level` (0-9), fresh for a new
/// stream.
fn with_compressor<R>(level: u32, f: impl FnOnce(&mut Compress) -> R) -> R {
    let level = level.min(9);
    COMPRESSORS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut all) => {
            let c = all[level as usize]
                .get_or_insert_with(|| Compress::new(Compression::new(level), true));
            c.reset();
            f(c)
        }
        // Re-entered (never, today): a compressor of its own.
        Err(_) => f(&mut Compress::new(Compression::new(level), true)),
    })
}

/// Whether `sample` shrinks by more than 2% at zlib level 1.
fn compresses(sample: &[u8]) -> bool {
    let mut out = Vec::with_capacity(2 * sample.len() + 64);
    match with_compressor(1, |c| {
        c.compress_vec(sample, &mut out, FlushCompress::Finish)
    }) {
        Ok(Status::StreamEnd) => out.len() < sample.len() - sample.len() / 50,
        _ => false,
    }
}

/// Writes a streamOptimized extent front to back, under a temporary name that the
/// file leaves for its own name only once [`StreamWriter::finish`] completed it (a
/// failed or killed writer never leaves a partial stream under the name).
#[derive(Debug)]
pub struct StreamWriter {
    file: NewFile,
    header: SparseHeader,
    /// Next sector to write.
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
    gd: Vec<u32>,
    /// The table being filled and its index.
    gt: Vec<u32>,
    gt_index: u64,
    gt_used: bool,
    last_grain: Option<u64>,
}

fn marker(num_sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&num_sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

impl StreamWriter {
    /// Starts `path` (which must not exist) for a disk of `capacity` bytes and writes
    /// the header and the embedded `descriptor`.
    pub fn create(path: &Path, capacity: u64, descriptor: &[u8]) -> Result<StreamWriter> {
        if descriptor.len() as u64 > DESCRIPTOR_SECTORS * SECTOR_SIZE {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                "descriptor too large for a stream file",
            ));
        }
        let capacity_sectors = capacity.div_ceil(SECTOR_SIZE);
        let header = SparseHeader {
            version: 3,
            flags: FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: capacity_sectors,
            grain_size: STREAM_GRAIN_SECTORS,
            descriptor_offset: 1,
            descriptor_size: DESCRIPTOR_SECTORS,
            num_gtes_per_gt: 512,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead: (1 + DESCRIPTOR_SECTORS).div_ceil(STREAM_GRAIN_SECTORS)
                * STREAM_GRAIN_SECTORS,
            unclean_shutdown: false,
            compress_algorithm: 1,
        };
        // Validate with the reader's rules (limits on capacity and directory size).
        SparseHeader::parse(&header.to_bytes())?;
        refuse_existing(path)?;
        let file = NewFile::beside(path, LockMode::Exclusive, true)?;
        let mut front = header.to_bytes().to_vec();
        front.extend_from_slice(descriptor);
        front.resize((header.overhead * SECTOR_SIZE) as usize, 0);
        let gd = vec![0u32; header.num_gdes() as usize];
        let w = StreamWriter {
            file,
            pos: header.overhead,
            buf: Vec::with_capacity(WRITE_BUFFER),
            buf_start: header.overhead,
            gd,
            gt: vec![0; 512],
            gt_index: 0,
            gt_used: false,
            last_grain: None,
            header,
        };
        w.file
            .storage()
            .write_all_at(&front, 0)
            .map_err(|e| Error::io("cannot write the stream header", e))?;
        Ok(w)
    }

    /// Disables fsync on finish (see `ConvertOptions::sync`).
    pub fn set_sync(&mut self, sync: bool) {
        self.file.set_sync(sync);
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        let padded = self.buf.len().div_ceil(512) * 512;
        self.buf.resize(padded, 0);
        self.pos = self.buf_start + (self.buf.len() as u64) / SECTOR_SIZE;
        if self.buf.len() >= WRITE_BUFFER {
            self.flush_buffer()?;
        }
        Ok(())
    }

    fn flush_buffer(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .storage()
                .write_all_at(&self.buf, self.buf_start * SECTOR_SIZE)
                .map_err(|e| Error::io("cannot write the stream", e))?;
            self.buf_start += (self.buf.len() as u64) / SECTOR_SIZE;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the current grain table (if it has entries) and starts table `next`.
    fn close_table(&mut self, next: u64) -> Result<()> {
        if self.gt_used {
            let gt_sectors = self.header.gt_sectors();
            self.emit(&marker(gt_sectors, MARKER_GT))?;
            self.gd[self.gt_index as usize] = u32::try_from(self.pos)
                .map_err(|_| Error::new(ErrorKind::FileTooBig, "stream file beyond 2 TiB"))?;
            let bytes: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.emit(&bytes)?;
            self.gt.fill(0);
            self.gt_used = false;
        }
        self.gt_index = next;
        Ok(())
    }

    /// Appends grain `grain` (index; grains must come in ascending order) whose zlib
    /// data is `compressed`.
    pub fn append_grain(&mut self, grain: u64, compressed: &[u8]) -> Result<()> {
        let grains = self.header.capacity.div_ceil(STREAM_GRAIN_SECTORS);
        if grain >= grains || self.last_grain.is_some_and(|g| g >= grain) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "stream grains must be written once each, in ascending order (grain {grain})"
                ),
            ));
        }
        self.last_grain = Some(grain);
        let table = grain / 512;
        if table != self.gt_index {
            self.close_table(table)?;
        }
        let sector = u32::try_from(self.pos)
            .map_err(|_| Error::new(ErrorKind::FileTooBig, "stream file beyond 2 TiB"))?;
        self.gt[(grain % 512) as usize] = sector;
        self.gt_used = true;
        let mut head = [0u8; 12];
        head[0..8].copy_from_slice(&(grain * STREAM_GRAIN_SECTORS).to_le_bytes());
        head[8..12].copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&head);
        self.emit(compressed)
    }

    /// Writes the last table, the directory, the footer and the end-of-stream marker.
    pub fn finish(mut self) -> Result<()> {
        let last = self.gt_index;
        self.close_table(last)?;
        let gd_sectors = self.header.gd_sectors();
        self.emit(&marker(gd_sectors, MARKER_GD))?;
        let gd_at = self.pos;
        let bytes: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.emit(&bytes)?;
        self.emit(&marker(1, MARKER_FOOTER))?;
        let mut footer = self.header.clone();
        footer.gd_offset = gd_at;
        self.emit(&footer.to_bytes())?;
        self.emit(&marker(0, MARKER_EOS))?;
        self.flush_buffer()?;
        self.file.publish().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::stream::inflate;

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def0u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn incompressible_grains_are_stored_and_round_trip() {
        let data = noise(65536);
        let z = compress_grain(&data, 6).unwrap();
        assert!(z.len() < data.len() + 64, "{}", z.len());
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(&z, &mut out).unwrap(), 65536);
        assert_eq!(out, data);
    }

    #[test]
    fn compressible_grains_shrink_and_round_trip() {
        let data: Vec<u8> = b"vdisk stream grain "
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        let z = compress_grain(&data, 6).unwrap();
        assert!(z.len() < 2048, "{}", z.len());
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(&z, &mut out).unwrap(), 65536);
        assert_eq!(out, data);
    }

    #[test]
    fn grains_must_come_in_ascending_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = StreamWriter::create(
            &dir.path().join("s.vmdk"),
            1 << 20,
            b"# Disk DescriptorFile\n",
        )
        .unwrap();
        let z = compress_grain(&[1u8; 65536], 6).unwrap();
        w.append_grain(3, &z).unwrap();
        assert_eq!(
            w.append_grain(3, &z).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            w.append_grain(1, &z).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            w.append_grain(16, &z).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
