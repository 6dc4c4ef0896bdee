//! streamOptimized extents: hosted sparse files whose grains are zlib-compressed and
//! preceded by markers. Read-only here (VMware does not support random writes to
//! them either); the append-only writer lives with clone/convert.
//!
//! Three layouts exist in the wild and are all read:
//! * the grain directory in the header (VMware's vdiskmanager and qemu-img output),
//! * `gdOffset = GD_AT_END` with a footer (a header copy holding the real directory
//!   offset) near the end of the file, possibly followed by padding or trailing bytes,
//! * no usable directory at all: the grain map is rebuilt by walking the markers.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use flate2::{Decompress, FlushDecompress, Status};

use crate::cache::GtCache;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::header::{has_sparse_magic, SparseHeader, GD_AT_END, HEADER_SIZE};
use crate::extent::ExtentMapping;
use crate::limits::{GT_CACHE_BYTES, MAX_REBUILT_GRAINS, MAX_TRAILING_BYTES, SECTOR_SIZE};
use crate::storage::{FileStorage, Storage};

/// Marker types (the `type` field of a metadata marker).
const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// Bytes of a grain marker before the compressed data (lba u64 + size u32).
const GRAIN_MARKER_HEADER: u64 = 12;
/// Decompressed grains kept for small sequential reads.
const GRAIN_CACHE_ENTRIES: usize = 8;

/// How grains are found.
#[derive(Debug)]
enum GrainIndex {
    /// A grain directory in the file; tables loaded on demand.
    Directory { gd: Vec<u32>, cache: Mutex<GtCache> },
    /// Rebuilt from the grain markers: marker sector per grain (0 = none).
    Rebuilt(Vec<u32>),
}

/// A streamOptimized extent.
#[derive(Debug)]
pub struct StreamExtent {
    storage: Box<dyn Storage>,
    name: String,
    header: SparseHeader,
    grain_bytes: u64,
    capacity_bytes: u64,
    gtes_per_gt: u64,
    file_len: u64,
    index: GrainIndex,
    grains: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl StreamExtent {
    /// Opens a streamOptimized extent on an opened file.
    pub fn open(storage: FileStorage) -> Result<StreamExtent> {
        let name = storage.path().display().to_string();
        Self::open_storage(Box::new(storage), &name)
    }

    /// Opens a streamOptimized extent on any [`Storage`] (an in-memory file in tests
    /// and fuzzing); `name` is used in error messages.
    pub fn open_storage(storage: Box<dyn Storage>, name: &str) -> Result<StreamExtent> {
        Self::open_inner(storage, name).map_err(|e| e.within(name))
    }

    fn open_inner(storage: Box<dyn Storage>, name: &str) -> Result<StreamExtent> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("cannot read file size", e))?;
        let mut hb = [0u8; HEADER_SIZE];
        storage
            .read_exact_at(&mut hb, 0)
            .map_err(|e| Error::io("cannot read the sparse header", e))?;
        let header = SparseHeader::parse(&hb)?;
        if !header.is_compressed() {
            return Err(Error::invalid("not a compressed (streamOptimized) extent"));
        }
        let file_sectors = file_len / SECTOR_SIZE;
        let mut ext = StreamExtent {
            grain_bytes: header.grain_bytes(),
            capacity_bytes: header.capacity * SECTOR_SIZE,
            gtes_per_gt: u64::from(header.num_gtes_per_gt),
            file_len,
            index: GrainIndex::Rebuilt(Vec::new()),
            grains: Mutex::new(VecDeque::new()),
            storage,
            name: name.to_string(),
            header,
        };
        // 1. The header's own directory; 2. the footer's; 3. rebuild from markers.
        let mut gd_offset = ext.header.gd_offset;
        if gd_offset == GD_AT_END {
            gd_offset = match find_footer(&*ext.storage, &ext.header, ext.file_len, &ext.name)? {
                Some(footer) => footer.gd_offset,
                None => GD_AT_END,
            };
        }
        let directory = if gd_offset != GD_AT_END {
            match ext.load_directory(gd_offset, file_sectors) {
                Ok(gd) => Some(gd),
                Err(e) => {
                    tracing::warn!("{name}: grain directory unusable ({e}); rebuilding the grain map from markers");
                    None
                }
            }
        } else {
            None
        };
        ext.index = match directory {
            Some(gd) => {
                let tables = (GT_CACHE_BYTES as u64 / (ext.gtes_per_gt * 4)).max(1) as usize;
                GrainIndex::Directory {
                    gd,
                    cache: Mutex::new(GtCache::new(tables)),
                }
            }
            None => GrainIndex::Rebuilt(ext.rebuild_from_markers(file_sectors)?),
        };
        Ok(ext)
    }

    fn load_directory(&self, gd_offset: u64, file_sectors: u64) -> Result<Vec<u32>> {
        let n = self.header.num_gdes();
        let gd_sectors = self.header.gd_sectors();
        gd_offset
            .checked_add(gd_sectors)
            .filter(|&e| gd_offset > 0 && e <= file_sectors)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "grain directory at sector {gd_offset} lies outside the file ({file_sectors} sectors)"
                ))
            })?;
        let mut buf = vec![0u8; (n * 4) as usize];
        self.storage
            .read_exact_at(&mut buf, gd_offset * SECTOR_SIZE)
            .map_err(|e| Error::io("cannot read the grain directory", e))?;
        let gd: Vec<u32> = buf.chunks_exact(4).map(|c| u32_at(c, 0)).collect();
        let gt_sectors = self.header.gt_sectors();
        for (i, &e) in gd.iter().enumerate() {
            if e != 0 && u64::from(e) + gt_sectors > file_sectors {
                return Err(Error::invalid(format!(
                    "grain directory entry {i} points to sector {e}, past the end of the file"
                )));
            }
        }
        Ok(gd)
    }

    /// Rebuilds the grain map by walking the markers from `overHead`: the marker sector
    /// of each grain. The walk must end at an end-of-stream marker: a stream without
    /// one was cut short (a download or copy that stopped), and the grains it lost
    /// would read as zeros - it is refused, as qemu-img, libvmdk and open-vmdk refuse
    /// it.
    fn rebuild_from_markers(&self, file_sectors: u64) -> Result<Vec<u32>> {
        let grains = self.capacity_bytes.div_ceil(self.grain_bytes);
        if grains > MAX_REBUILT_GRAINS {
            return Err(Error::new(
                ErrorKind::OutOfMemory,
                format!("the stream has no usable grain directory and {grains} grains are too many to index"),
            ));
        }
        let mut map = vec![0u32; grains as usize];
        let walk = walk_markers(
            &*self.storage,
            &self.header,
            file_sectors * SECTOR_SIZE,
            &mut |grain, marker, _size| {
                map[grain as usize] = u32::try_from(marker)
                    .map_err(|_| Error::invalid("grain marker beyond 2 TiB"))?;
                Ok(())
            },
        )?;
        match walk.end {
            StreamEnd::EndOfStream { .. } => Ok(map),
            end => Err(Error::invalid(format!(
                "the stream has no usable grain directory and {}: the file is truncated (qemu-img and VMware refuse it too); get the whole file again",
                end.describe()
            ))),
        }
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// The header as read from sector 0.
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// The raw bytes of the embedded descriptor area, if any.
    pub fn read_embedded_descriptor(&self) -> Result<Option<Vec<u8>>> {
        crate::extent::sparse::read_descriptor_area(&*self.storage, &self.header, &self.name)
    }

    /// Marker sector of grain `grain`, 0 if the grain is not stored.
    fn marker_of(&self, grain: u64) -> Result<u64> {
        match &self.index {
            GrainIndex::Rebuilt(map) => Ok(u64::from(map[grain as usize])),
            GrainIndex::Directory { gd, cache } => {
                let index = grain / self.gtes_per_gt;
                let gde = gd[index as usize];
                if gde == 0 {
                    return Ok(0);
                }
                let mut cache = cache
                    .lock()
                    .map_err(|_| Error::new(ErrorKind::Fail, "grain table cache poisoned"))?;
                if cache.get(index).is_none() {
                    let mut buf = vec![0u8; (self.gtes_per_gt * 4) as usize];
                    self.storage
                        .read_exact_at(&mut buf, u64::from(gde) * SECTOR_SIZE)
                        .map_err(|e| {
                            Error::io(format!("{}: cannot read grain table {index}", self.name), e)
                        })?;
                    let entries = buf.chunks_exact(4).map(|c| u32_at(c, 0)).collect();
                    cache.evict_if_full();
                    cache.insert(index, entries, false);
                }
                let entry = cache
                    .get(index)
                    .map(|t| t.entries[(grain % self.gtes_per_gt) as usize])
                    .unwrap_or(0);
                Ok(u64::from(entry))
            }
        }
    }

    /// Where `offset` lives: a compressed grain, or nothing (runs of absent grains
    /// are coalesced).
    pub fn map(&self, offset: u64, len: u64) -> Result<(ExtentMapping, u64)> {
        let g = self.grain_bytes;
        let end = offset + len.min(self.capacity_bytes - offset);
        let first = offset / g;
        let marker = self.marker_of(first)?;
        let in_grain = offset - first * g;
        if marker != 0 {
            if marker <= 1 || marker >= self.file_len / SECTOR_SIZE {
                return Err(Error::invalid(format!(
                    "{}: grain {first} points to sector {marker}, outside the file",
                    self.name
                )));
            }
            let n = (g - in_grain).min(end - offset);
            return Ok((
                ExtentMapping::Compressed {
                    marker,
                    grain: first,
                    offset_in_grain: in_grain,
                },
                n,
            ));
        }
        // Whole tables the directory does not have are skipped at once: a directory
        // of millions of empty entries must not cost a lookup per grain.
        let mut grain = first + 1;
        while grain * g < end {
            if let GrainIndex::Directory { gd, .. } = &self.index {
                let table = grain / self.gtes_per_gt;
                if gd[table as usize] == 0 {
                    grain = (table + 1) * self.gtes_per_gt;
                    continue;
                }
            }
            if self.marker_of(grain)? != 0 {
                break;
            }
            grain += 1;
        }
        Ok((ExtentMapping::Unallocated, (grain * g).min(end) - offset))
    }

    /// Copies bytes of the grain whose marker is at sector `marker`, starting
    /// `offset_in_grain` bytes into the grain.
    pub fn read_compressed(
        &self,
        marker: u64,
        grain: u64,
        offset_in_grain: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let grain = self.grain(marker, grain)?;
        let start = offset_in_grain as usize;
        buf.copy_from_slice(&grain[start..start + buf.len()]);
        Ok(())
    }

    /// The decompressed grain `index` whose marker is at sector `marker` (cached).
    fn grain(&self, marker: u64, index: u64) -> Result<Arc<Vec<u8>>> {
        if let Ok(cache) = self.grains.lock() {
            if let Some((_, g)) = cache.iter().find(|(m, _)| *m == marker) {
                return Ok(Arc::clone(g));
            }
        }
        let data = Arc::new(self.inflate_grain(marker, index)?);
        if let Ok(mut cache) = self.grains.lock() {
            if cache.len() >= GRAIN_CACHE_ENTRIES {
                cache.pop_front();
            }
            cache.push_back((marker, Arc::clone(&data)));
        }
        Ok(data)
    }

    fn inflate_grain(&self, marker: u64, index: u64) -> Result<Vec<u8>> {
        let g = self.grain_bytes;
        let pos = marker * SECTOR_SIZE;
        let mut head = [0u8; GRAIN_MARKER_HEADER as usize];
        self.storage.read_exact_at(&mut head, pos).map_err(|e| {
            Error::io(
                format!(
                    "{}: cannot read the grain marker at sector {marker}",
                    self.name
                ),
                e,
            )
        })?;
        let lba = u64_at(&head, 0);
        let size = u64::from(u32_at(&head, 8));
        if size == 0 || size > max_compressed_bytes(g) {
            return Err(Error::invalid(format!(
                "{}: grain marker at sector {marker} has an invalid compressed size {size}",
                self.name
            )));
        }
        let want = index * self.header.grain_size;
        if lba != want {
            return Err(Error::invalid(format!(
                "{}: grain marker at sector {marker} says LBA {lba}, but the grain table puts grain LBA {want} there",
                self.name
            )));
        }
        let expected = g.min(self.capacity_bytes - lba * SECTOR_SIZE) as usize;
        // `marker` lies inside the file (checked by `map`) and `size` is bounded: no
        // overflow.
        if pos + GRAIN_MARKER_HEADER + size > self.file_len {
            return Err(Error::invalid(format!(
                "{}: grain at sector {marker} ({size} bytes of compressed data) extends past the end of the file ({} bytes)",
                self.name, self.file_len
            )));
        }
        let mut compressed = vec![0u8; size as usize];
        self.storage
            .read_exact_at(&mut compressed, pos + GRAIN_MARKER_HEADER)
            .map_err(|e| {
                Error::io(
                    format!("{}: grain at sector {marker} is truncated", self.name),
                    e,
                )
            })?;
        let mut out = vec![0u8; g as usize];
        let produced = inflate(&compressed, &mut out).map_err(|m| {
            Error::invalid(format!(
                "{}: grain at sector {marker} (LBA {lba}) is corrupt: {m}",
                self.name
            ))
        })?;
        // Only the final, partial grain of a disk may inflate to less than a grain.
        if produced < expected {
            return Err(Error::invalid(format!(
                "{}: grain at sector {marker} inflates to {produced} bytes, expected {expected}",
                self.name
            )));
        }
        Ok(out)
    }

    /// Size of the file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
}

/// Looks for a footer (marker type 3 followed by a header copy) at the end of the
/// file, tolerating up to [`MAX_TRAILING_BYTES`] of padding or junk after it.
pub fn find_footer(
    storage: &dyn Storage,
    header: &SparseHeader,
    file_len: u64,
    name: &str,
) -> Result<Option<SparseHeader>> {
    let end = file_len / SECTOR_SIZE * SECTOR_SIZE;
    let span = end.min(MAX_TRAILING_BYTES + 3 * SECTOR_SIZE);
    if span < 2 * SECTOR_SIZE {
        return Ok(None);
    }
    let start = end - span;
    let mut tail = vec![0u8; span as usize];
    storage
        .read_exact_at(&mut tail, start)
        .map_err(|e| Error::io("cannot read the end of the file", e))?;
    // From the end backwards: the last footer in the file wins.
    let sectors = (span / SECTOR_SIZE) as usize;
    for i in (0..sectors - 1).rev() {
        let marker = &tail[i * 512..(i + 1) * 512];
        let body = &tail[(i + 1) * 512..(i + 2) * 512];
        if u32_at(marker, 8) == 0
            && u32_at(marker, 12) == MARKER_FOOTER
            && has_sparse_magic(body)
            && start + (i as u64) * SECTOR_SIZE >= header.overhead * SECTOR_SIZE
        {
            let mut hb = [0u8; HEADER_SIZE];
            hb.copy_from_slice(body);
            match SparseHeader::parse(&hb) {
                Ok(f) if f.gd_offset != GD_AT_END && f.grain_size == header.grain_size => {
                    return Ok(Some(f))
                }
                Ok(_) => continue,
                Err(e) => tracing::warn!("{}: ignoring a damaged footer: {e}", name),
            }
        }
    }
    Ok(None)
}

/// How a walk over a stream's markers ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// At an end-of-stream marker (an all-zero sector) at this sector.
    EndOfStream {
        /// Sector of the marker.
        sector: u64,
    },
    /// At the end of the file, between two markers, with no end-of-stream marker.
    FileEnd {
        /// Sector where the next marker would have been.
        sector: u64,
    },
    /// Inside a grain or metadata block that runs past the end of the file.
    CutShort {
        /// Sector of the marker whose block is cut.
        sector: u64,
        /// Bytes of the block (after its marker) the marker announces.
        bytes: u64,
    },
}

impl StreamEnd {
    /// What the end says, for messages ("ends at ...").
    pub fn describe(&self) -> String {
        match *self {
            StreamEnd::EndOfStream { sector } => {
                format!("ends with an end-of-stream marker at sector {sector}")
            }
            StreamEnd::FileEnd { sector } => {
                format!("ends at sector {sector} without an end-of-stream marker")
            }
            StreamEnd::CutShort { sector, bytes } => format!(
                "ends inside the block of the marker at sector {sector} ({bytes} bytes announced)"
            ),
        }
    }
}

/// What a walk over a stream's markers saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkerWalk {
    /// How it ended.
    pub end: StreamEnd,
    /// Grain markers seen.
    pub grains: u64,
    /// Metadata markers (grain table, directory, footer, others) seen before the end.
    pub metadata_markers: u64,
    /// Whether a footer marker was among them.
    pub footer: bool,
}

/// Walks the markers of a streamOptimized file from `overHead` to its end-of-stream
/// marker (an all-zero sector) or the end of the file (`file_len` bytes), calling
/// `on_grain(grain index, marker sector, compressed bytes)` for each grain marker.
/// A grain marker with an LBA that is not a grain start inside the disk, a
/// compressed size beyond any grain, or a metadata marker whose length overflows is
/// an error; a block cut by the end of the file ends the walk
/// ([`StreamEnd::CutShort`]). Reads one sector per marker: the cost follows the
/// number of grains, not the capacity.
pub fn walk_markers(
    storage: &dyn Storage,
    header: &SparseHeader,
    file_len: u64,
    on_grain: &mut dyn FnMut(u64, u64, u64) -> Result<()>,
) -> Result<MarkerWalk> {
    let grain_sectors = header.grain_size;
    let grain_bytes = header.grain_bytes();
    let grains = (header.capacity * SECTOR_SIZE).div_ceil(grain_bytes);
    let file_sectors = file_len / SECTOR_SIZE;
    let mut walk = MarkerWalk {
        end: StreamEnd::FileEnd { sector: 0 },
        grains: 0,
        metadata_markers: 0,
        footer: false,
    };
    let mut pos = header.overhead.max(1);
    let mut sector = [0u8; 512];
    while pos < file_sectors {
        storage
            .read_exact_at(&mut sector, pos * SECTOR_SIZE)
            .map_err(|e| Error::io(format!("cannot read the marker at sector {pos}"), e))?;
        let value = u64_at(&sector, 0);
        let size = u64::from(u32_at(&sector, 8));
        if size != 0 {
            if !value.is_multiple_of(grain_sectors) || value / grain_sectors >= grains {
                return Err(Error::invalid(format!(
                    "grain marker at sector {pos} has LBA {value}, not a grain start inside the disk"
                )));
            }
            if size > max_compressed_bytes(grain_bytes) {
                return Err(Error::invalid(format!(
                    "grain marker at sector {pos} has an invalid compressed size {size}"
                )));
            }
            let next = pos + (GRAIN_MARKER_HEADER + size).div_ceil(SECTOR_SIZE);
            if pos * SECTOR_SIZE + GRAIN_MARKER_HEADER + size > file_len {
                walk.end = StreamEnd::CutShort {
                    sector: pos,
                    bytes: size,
                };
                return Ok(walk);
            }
            on_grain(value / grain_sectors, pos, size)?;
            walk.grains += 1;
            pos = next;
        } else {
            let kind = u32_at(&sector, 12);
            if kind == MARKER_EOS {
                walk.end = StreamEnd::EndOfStream { sector: pos };
                return Ok(walk);
            }
            let next = pos
                .checked_add(1)
                .and_then(|p| p.checked_add(value))
                .ok_or_else(|| {
                    Error::invalid(format!("marker at sector {pos} has an absurd length"))
                })?;
            if next > file_sectors {
                walk.end = StreamEnd::CutShort {
                    sector: pos,
                    bytes: value.saturating_mul(SECTOR_SIZE),
                };
                return Ok(walk);
            }
            walk.metadata_markers += 1;
            walk.footer |= kind == MARKER_FOOTER;
            pos = next;
        }
    }
    walk.end = StreamEnd::FileEnd { sector: pos };
    Ok(walk)
}

/// The largest compressed size a grain marker may announce: zlib's worst case for an
/// incompressible grain, with room to spare.
fn max_compressed_bytes(grain_bytes: u64) -> u64 {
    2 * grain_bytes + 1024
}

/// Inflates a zlib stream (or, failing that, raw deflate) into `out`; returns the
/// number of bytes produced. Output beyond `out.len()` is an error.
pub fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    let attempt = |zlib: bool, out: &mut [u8]| -> std::result::Result<usize, String> {
        with_decompressor(zlib, |d| {
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(Status::StreamEnd) => Ok(d.total_out() as usize),
                Ok(_) if d.total_out() as usize == out.len() => {
                    Err("decompressed data is larger than a grain".to_string())
                }
                Ok(_) => Err("compressed data ends early".to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
    };
    attempt(true, out).or_else(|zlib_err| attempt(false, out).map_err(|_| zlib_err))
}

thread_local! {
    /// Each thread's inflaters (zlib, raw deflate), reset between grains: a new
    /// one allocates its window and tables for every grain.
    static DECOMPRESSORS: RefCell<[Option<Decompress>; 2]> = RefCell::new(Default::default());
}

/// Runs `f` with this thread's inflater (zlib or raw deflate), fresh for a new
/// stream.
fn with_decompressor<R>(zlib: bool, f: impl FnOnce(&mut Decompress) -> R) -> R {
    DECOMPRESSORS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut all) => {
            let d = all[usize::from(zlib)].get_or_insert_with(|| Decompress::new(zlib));
            d.reset(zlib);
            f(d)
        }
        Err(_) => f(&mut Decompress::new(zlib)),
    })
}
