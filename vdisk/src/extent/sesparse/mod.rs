//! seSparse extents (ESXi "space-efficient sparse", `-sesparse.vmdk`): the delta format
//! ESXi uses for snapshots on VMFS6 and of disks over 2 TB.
//!
//! VMware never published the format; what is known comes from qemu's reader,
//! xen-orchestra's reader and ESXi `hostd.log` dumps (`docs/vmdk-format.md` §6).
//!
//! # Layout
//!
//! * Sector 0: the *constant header* (26 little-endian u64 and zero padding): magic
//!   `0xCAFEBABE`, version 2.1, capacity, grain size (8 sectors), grain table size (64
//!   sectors = 4096 entries), then offset and size (in sectors) of every region: volatile
//!   header, journal header, journal, grain directory, grain tables, free bitmap,
//!   backmap, grains.
//! * The *volatile header*: magic `0xCAFECAFE`, `free_gt_number`, `next_txn_seq_number`,
//!   `replay_journal`, zero padding.
//! * Grain directory entries (u64): 0 = no table; otherwise the top 32 bits are
//!   `0x10000000` and the low 32 bits the *index* of a grain table, which lives at
//!   `grain_tables_offset + index * 64` sectors.
//! * Grain table entries (u64), by top nibble: 0 unallocated (the whole entry must be 0:
//!   ask the parent), 1 "SCSI-unmapped" and 2 "zero" (both read as zeros, as qemu and
//!   xen-orchestra read them), 3 allocated: the 60 payload bits hold a grain *slot* index
//!   rotated by 12 bits (bits 48..59 are its low 12 bits, bits 0..47 its high bits); the
//!   data is at `grains_offset + slot * 8` sectors. Other types are errors.
//!
//! # What this module does
//!
//! * [`SeSparseExtent::open`] validates the headers with checked arithmetic and the
//!   limits of [`crate::limits`] before allocating anything: magic, version, grain and
//!   table sizes, flags, reserved fields and padding (zero, as qemu requires), every
//!   region inside the 64-bit byte range and no two regions overlapping, a directory
//!   large enough for the capacity, every directory entry well-formed, inside the grain
//!   table area and the file, and no table shared by two entries. Grain table entries are
//!   checked when used (type, slot inside the grain area, data inside the file). Only
//!   the directory entries the capacity needs are read (at most 4 Mi entries, 16 MiB in
//!   memory); grain tables are kept in a bounded LRU cache
//!   ([`crate::limits::GT_CACHE_BYTES`]).
//! * Writes follow the hosted sparse extent: data goes in place into allocated grains;
//!   unallocated or zero grains are *claimed* under the state mutex (marked in flight,
//!   slots reserved at the end of the used part of the grain area), written with no lock
//!   held (a partial grain completed from the chain below, or with zeros for a zero
//!   grain), then recorded in their grain tables. New grain tables take the next unused
//!   index of the grain table area.
//! * [`SeSparseExtent::flush`] writes in crash-consistent order with a sync between
//!   steps: grain data, dirty grain tables, dirty directory entries, volatile header
//!   (`free_gt_number` = next unused table index). A dirty table evicted from the cache
//!   is written the same way (data synced first).
//! * The next free grain slot is derived on a writable open from the file length when
//!   the grain area is the file's last region and the file ends inside it (every
//!   allocated grain lies below the end of the file, which reads check); otherwise (a
//!   preallocated file) every grain table is scanned once, one table in memory at a
//!   time. The next table index is one past the highest index the directory uses (or
//!   `free_gt_number` if larger and inside the table area).
//! * [`create_sesparse`] lays a new file out the way the `hostd.log` example shows (each
//!   region rounded up to 1 MiB; for a 100 MiB disk exactly: volatile header 1:1, journal
//!   header 2:2, journal 2048:2048, directory 4096:2048, tables 6144:2048, free bitmap
//!   8192:2048, backmap 10240:2048, grains 12288:204800). Region sizes: directory 8
//!   bytes per 16 MiB of capacity, table area 32 KiB per directory entry, free bitmap
//!   one bit per grain, backmap 8 bytes per grain (these two sizes are inferences), grain
//!   area the capacity rounded up to a grain. The file is extended (sparsely) to the
//!   start of the grain area; everything but the two headers is zeros.
//!
//! # What is not supported
//!
//! * **Journal replay**: a volatile header with `replay_journal != 0` is refused with
//!   [`ErrorKind::NeedsRepair`]. The journal is never written; its header and area stay
//!   as they are (zeros in files made by [`create_sesparse`]).
//! * **Free bitmap and backmap**: their encodings are unknown. They are never read nor
//!   written (zeros in files made by [`create_sesparse`]); grains allocated by this module
//!   are not recorded there. qemu ignores both; whether ESXi accepts a file written here
//!   (or reuses slots it believes free) is untested - treat written files as files for
//!   this library and qemu, not for ESXi.
//! * Space reclamation and unmap: a grain once allocated stays allocated. (Whole grains
//!   of zeros written where the grain has no data become type 2 "zero" entries.)
//! * There is no "open for writing" mark ([`SeSparseExtent::begin_write`] does nothing):
//!   the only candidate, `replay_journal`, makes qemu (and this module) refuse the file.
//! * `free_gt_number` is read as "next unused grain table index" (inferred from its
//!   name); `next_txn_seq_number` is kept as read.

mod create;
mod header;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use crate::error::{Error, ErrorKind, Result};
use crate::extent::grains::{Geometry, GrainEngine, GrainFormat, GrainState, MetaWriter};
use crate::limits::{MAX_SESPARSE_CAPACITY_SECTORS, SECTOR_SIZE};
use crate::storage::{FileStorage, Storage};

pub use create::create_sesparse;
pub(crate) use header::{u64_at, ConstHeader, VolatileHeader};

/// Magic of the constant header (first u64 of the file).
pub const SESPARSE_MAGIC: u64 = 0xCAFE_BABE;
/// Magic of the volatile header.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0xCAFE_CAFE;
/// The only version known: 2.1.
pub const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;
/// Sectors per grain (fixed by the format as known).
pub const SESPARSE_GRAIN_SECTORS: u64 = 8;
/// Sectors per grain table (4096 u64 entries; fixed by the format as known).
pub const SESPARSE_GT_SECTORS: u64 = 64;

pub(crate) const HEADER_BYTES: usize = 512;
pub(crate) const GRAIN_BYTES: u64 = SESPARSE_GRAIN_SECTORS * SECTOR_SIZE;
pub(crate) const GT_BYTES: u64 = SESPARSE_GT_SECTORS * SECTOR_SIZE;
pub(crate) const GTES_PER_GT: u64 = GT_BYTES / 8;
/// Guest sectors one grain table (one directory entry) covers: 16 MiB.
const SECTORS_PER_GT: u64 = GTES_PER_GT * SESPARSE_GRAIN_SECTORS;
/// Directory entries per sector.
const GDES_PER_SECTOR: u64 = SECTOR_SIZE / 8;

/// Directory entry type bits of a table reference (the top 32 bits must be exactly this).
pub(crate) const GDE_TABLE: u64 = 0x1000_0000_0000_0000;
pub(crate) const GDE_HIGH_MASK: u64 = 0xFFFF_FFFF_0000_0000;
/// In-memory directory value "no grain table".
const NO_GT: u32 = u32::MAX;

const GTE_TYPE_SHIFT: u32 = 60;
const GTE_UNMAPPED: u64 = 0x1;
const GTE_ZERO: u64 = 0x2;
const GTE_ALLOCATED: u64 = 0x3;
/// Largest grain slot index an entry can encode (60 bits).
const MAX_SLOT: u64 = (1 << 60) - 1;

/// qemu reads grain table positions as 32-bit sector numbers; [`create_sesparse`]
/// keeps the table area below this.
const QEMU_MAX_GT_SECTOR: u64 = 0xFFFF_FFFF;

/// Layout alignment of [`create_sesparse`]: 1 MiB.
const REGION_ALIGN_SECTORS: u64 = 2048;

/// Decodes the grain slot of an allocated (type 3) grain table entry.
fn decode_slot(entry: u64) -> u64 {
    ((entry >> 48) & 0xFFF) | ((entry & 0xFFFF_FFFF_FFFF) << 12)
}

/// Encodes an allocated grain table entry for grain slot `slot` (at most 60 bits).
fn encode_slot(slot: u64) -> u64 {
    (GTE_ALLOCATED << GTE_TYPE_SHIFT) | ((slot & 0xFFF) << 48) | (slot >> 12)
}

/// An open seSparse extent file. See the [module documentation](self) for what is
/// supported.
pub type SeSparseExtent = GrainEngine<SeSparseFormat>;

/// What does not change while a seSparse file is open.
#[derive(Debug)]
pub struct SeSparseFormat {
    name: String,
    header: ConstHeader,
    gt_slots: u64,
    grain_slots: u64,
}

/// A seSparse file's metadata under the engine's lock.
#[derive(Debug)]
pub struct SeSparseMeta {
    /// Grain table index per needed directory entry, [`NO_GT`] for none.
    gd: Vec<u32>,
    /// Directory sectors (relative to the directory) with changed entries.
    gd_dirty: BTreeSet<u64>,
    volatile: VolatileHeader,
    volatile_dirty: bool,
    /// Next unused grain table index.
    next_gt: u64,
    /// Next unused grain slot.
    next_slot: u64,
}

impl GrainFormat for SeSparseFormat {
    type Entry = u64;
    type Meta = SeSparseMeta;

    fn table_offset(&self, meta: &SeSparseMeta, index: u64) -> Option<u64> {
        match meta.gd[index as usize] {
            NO_GT => None,
            gt => Some(self.header.gt_byte_offset(gt)),
        }
    }

    fn write_table(
        &self,
        meta: &mut SeSparseMeta,
        out: &mut MetaWriter<'_>,
        index: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let gt = meta.gd[index as usize];
        out.write(
            bytes,
            self.header.gt_byte_offset(gt),
            &format!("grain table {gt}"),
        )
    }

    /// The next unused index of the table area. The table reaches the file
    /// before the directory entry does.
    fn allocate_table(&self, meta: &mut SeSparseMeta, index: u64) -> Result<u64> {
        let gt = meta.next_gt;
        if gt >= self.gt_slots || gt >= u64::from(NO_GT) {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                format!(
                    "{}: the grain table area is full ({} tables)",
                    self.name, self.gt_slots
                ),
            ));
        }
        let gt = gt as u32; // below NO_GT
        meta.next_gt = u64::from(gt) + 1;
        meta.gd[index as usize] = gt;
        meta.gd_dirty.insert(index / GDES_PER_SECTOR);
        meta.volatile.free_gt_number = meta.next_gt;
        meta.volatile_dirty = true;
        Ok(self.header.gt_byte_offset(gt) + GT_BYTES)
    }

    fn decode(
        &self,
        meta: &mut SeSparseMeta,
        grain: u64,
        entry: u64,
        file_len: u64,
    ) -> Result<GrainState> {
        let gt = meta.gd[(grain / GTES_PER_GT) as usize];
        let i = grain % GTES_PER_GT;
        match classify_gte(entry, self.grain_slots) {
            Ok(GteKind::Unallocated) => Ok(GrainState::Unallocated),
            Ok(GteKind::Zero) => Ok(GrainState::Zero),
            Ok(GteKind::Slot(slot)) => {
                let offset = self.header.slot_byte_offset(slot);
                let capacity = self.header.capacity * SECTOR_SIZE;
                let needed = GRAIN_BYTES.min(capacity - grain * GRAIN_BYTES);
                if offset + needed > file_len {
                    return Err(Error::invalid(format!(
                        "{}: grain table {gt} entry {i} names grain slot {slot} at byte {offset}, past the end of the file ({file_len} bytes)",
                        self.name
                    )));
                }
                Ok(GrainState::Data(offset))
            }
            Err(why) => Err(Error::invalid(format!(
                "{}: grain table {gt} entry {i} {why}",
                self.name
            ))),
        }
    }

    fn is_zero_entry(&self, entry: u64) -> bool {
        matches!(entry >> GTE_TYPE_SHIFT, GTE_UNMAPPED | GTE_ZERO)
    }

    fn zero_entry(&self, _: &mut SeSparseMeta, _: &mut MetaWriter<'_>) -> Result<Option<u64>> {
        Ok(Some(GTE_ZERO << GTE_TYPE_SHIFT))
    }

    /// Slots at the end of the used part of the grain area.
    fn reserve_grains(&self, meta: &mut SeSparseMeta, n: u64) -> Result<u64> {
        let slot = meta.next_slot;
        match slot.checked_add(n) {
            Some(end) if end <= self.grain_slots && end <= MAX_SLOT => meta.next_slot = end,
            _ => {
                return Err(Error::new(
                    ErrorKind::FileTooBig,
                    format!(
                        "{}: the grain area is full ({} grains)",
                        self.name, self.grain_slots
                    ),
                ))
            }
        }
        Ok(self.header.slot_byte_offset(slot))
    }

    fn data_entry(&self, file_offset: u64) -> Result<u64> {
        let start = self.header.slot_byte_offset(0);
        match file_offset.checked_sub(start) {
            Some(b) => Ok(encode_slot(b / GRAIN_BYTES)),
            None => Err(Error::new(
                ErrorKind::Fail,
                format!("{}: a new grain below the grain area", self.name),
            )),
        }
    }

    fn open(storage: Box<dyn Storage>, name: &str, writable: bool) -> Result<GrainEngine<Self>> {
        open_sesparse(storage, writable, name)
    }

    /// Dirty directory sectors, then (after a barrier) the volatile header with
    /// `free_gt_number` = next unused table index.
    fn flush_metadata(&self, meta: &mut SeSparseMeta, out: &mut MetaWriter<'_>) -> Result<()> {
        let gd_at = self.header.gd_offset * SECTOR_SIZE;
        while let Some(sector) = meta.gd_dirty.pop_first() {
            let first = (sector * GDES_PER_SECTOR) as usize;
            let last = (first + GDES_PER_SECTOR as usize).min(meta.gd.len());
            let mut bytes = Vec::with_capacity((last - first) * 8);
            for &t in &meta.gd[first..last] {
                let e = if t == NO_GT {
                    0
                } else {
                    GDE_TABLE | u64::from(t)
                };
                bytes.extend_from_slice(&e.to_le_bytes());
            }
            if let Err(e) = out.write(&bytes, gd_at + first as u64 * 8, "the grain directory") {
                meta.gd_dirty.insert(sector);
                return Err(e);
            }
        }
        if meta.volatile_dirty {
            out.barrier()?;
            out.write(
                &meta.volatile.to_bytes(),
                self.header.volatile_offset * SECTOR_SIZE,
                "the volatile header",
            )?;
            meta.volatile_dirty = false;
        }
        Ok(())
    }
}

impl GrainEngine<SeSparseFormat> {
    /// Does nothing: seSparse has no "open for writing" mark that readers tolerate
    /// (see the module documentation). Kept for symmetry with the other extents.
    pub fn begin_write(&self) -> Result<()> {
        Ok(())
    }

    /// A clean close: [`GrainEngine::flush`].
    pub fn close(&self) -> Result<()> {
        self.flush()
    }
}

/// Opens and checks a seSparse file: both headers, the layout, and the directory
/// entries the capacity needs. Errors are [`ErrorKind::InvalidDisk`] for malformed
/// files (naming the field or entry at fault), [`ErrorKind::UnsupportedDiskVersion`]
/// for another version or unknown flags, and [`ErrorKind::NeedsRepair`] when the
/// journal must be replayed.
fn open_sesparse(storage: Box<dyn Storage>, writable: bool, name: &str) -> Result<SeSparseExtent> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io("cannot read file size", e))?;
    if file_len < HEADER_BYTES as u64 {
        return Err(Error::invalid(format!(
            "file is {file_len} bytes, too short for a seSparse header"
        )));
    }
    let mut hb = [0u8; HEADER_BYTES];
    storage
        .read_exact_at(&mut hb, 0)
        .map_err(|e| Error::io("cannot read the seSparse constant header", e))?;
    let header = ConstHeader::parse(&hb)?;
    header.validate_layout()?;

    let vh_at = header.volatile_offset * SECTOR_SIZE;
    if vh_at + HEADER_BYTES as u64 > file_len {
        return Err(Error::invalid(format!(
            "the volatile header (sector {}) lies past the end of the file ({file_len} bytes)",
            header.volatile_offset
        )));
    }
    let mut vb = [0u8; HEADER_BYTES];
    storage
        .read_exact_at(&mut vb, vh_at)
        .map_err(|e| Error::io("cannot read the seSparse volatile header", e))?;
    let volatile = VolatileHeader::parse(&vb)?;

    // The directory: only the entries the capacity needs (at most 4 Mi by the
    // capacity limit).
    let needed = header.needed_gdes();
    let gd_at = header.gd_offset * SECTOR_SIZE;
    let gd_bytes = needed * 8;
    if gd_at + gd_bytes > file_len {
        return Err(Error::invalid(format!(
            "the grain directory (sectors {}.., {needed} entries) lies past the end of the file ({file_len} bytes)",
            header.gd_offset
        )));
    }
    let gd = read_directory(&*storage, &header, file_len)?;
    let mut next_gt = check_tables_unshared(&gd)?;
    let gt_slots = header.gt_slots();
    if volatile.free_gt_number > next_gt && volatile.free_gt_number <= gt_slots {
        next_gt = volatile.free_gt_number;
    }

    let grain_slots = header.grain_slots();
    let next_slot = if writable {
        next_free_slot(&*storage, &header, &gd, file_len)?
    } else {
        0
    };
    let format = SeSparseFormat {
        name: name.to_string(),
        header,
        gt_slots,
        grain_slots,
    };
    let geo = Geometry {
        grain_bytes: GRAIN_BYTES,
        capacity_bytes: format.header.capacity * SECTOR_SIZE,
        entries_per_table: GTES_PER_GT,
    };
    let meta = SeSparseMeta {
        gd,
        gd_dirty: BTreeSet::new(),
        volatile,
        volatile_dirty: false,
        next_gt,
        next_slot,
    };
    Ok(GrainEngine::new(
        storage, name, writable, format, meta, geo, file_len,
    ))
}

/// What a grain table entry says, by the format's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GteKind {
    /// Not stored here: ask the parent.
    Unallocated,
    /// Reads as zeros (zero or SCSI-unmapped).
    Zero,
    /// Data in this grain slot (below the grain area's slot count).
    Slot(u64),
}

/// Classifies grain table entry `entry` of a file whose grain area holds
/// `grain_slots` grains; the error says what is wrong with it ("is ...: ...").
pub(crate) fn classify_gte(entry: u64, grain_slots: u64) -> std::result::Result<GteKind, String> {
    match entry >> GTE_TYPE_SHIFT {
        0 if entry == 0 => Ok(GteKind::Unallocated),
        0 => Err(format!(
            "is {entry:#018x}: unallocated type with a non-zero payload"
        )),
        GTE_UNMAPPED | GTE_ZERO => Ok(GteKind::Zero),
        GTE_ALLOCATED => {
            let slot = decode_slot(entry);
            if slot >= grain_slots {
                return Err(format!(
                    "names grain slot {slot}, past the grain area ({grain_slots} grains)"
                ));
            }
            Ok(GteKind::Slot(slot))
        }
        t => Err(format!("is {entry:#018x}: unknown grain type {t:#x}")),
    }
}

/// Reads and checks the directory entries the capacity needs (in 1 MiB pieces):
/// each 0 or a reference to a table inside the table area and the file.
fn read_directory(storage: &dyn Storage, h: &ConstHeader, file_len: u64) -> Result<Vec<u32>> {
    const CHUNK_ENTRIES: u64 = 1 << 17;
    let needed = h.needed_gdes();
    let gt_slots = h.gt_slots();
    let gd_at = h.gd_offset * SECTOR_SIZE;
    let mut gd = Vec::with_capacity(
        usize::try_from(needed)
            .map_err(|_| Error::new(ErrorKind::OutOfMemory, "grain directory too large"))?,
    );
    let mut buf = Vec::new();
    let mut first = 0u64;
    while first < needed {
        let n = CHUNK_ENTRIES.min(needed - first);
        buf.resize((n * 8) as usize, 0);
        storage
            .read_exact_at(&mut buf, gd_at + first * 8)
            .map_err(|e| Error::io("cannot read the grain directory", e))?;
        for (k, c) in buf.chunks_exact(8).enumerate() {
            let i = first + k as u64;
            let e = u64_at(c, 0);
            if e == 0 {
                gd.push(NO_GT);
                continue;
            }
            if e & GDE_HIGH_MASK != GDE_TABLE {
                return Err(Error::invalid(format!(
                    "grain directory entry {i} is {e:#018x}: neither 0 nor a grain table reference (top 32 bits 0x10000000)"
                )));
            }
            let index = e & 0xFFFF_FFFF;
            if index >= gt_slots || index >= u64::from(NO_GT) {
                return Err(Error::invalid(format!(
                    "grain directory entry {i} names grain table {index}, outside the grain table area ({gt_slots} tables)"
                )));
            }
            let index = index as u32; // below NO_GT
            let end = h.gt_byte_offset(index) + GT_BYTES;
            if end > file_len {
                return Err(Error::invalid(format!(
                    "grain table {index} (grain directory entry {i}) ends at byte {end}, past the end of the file ({file_len} bytes)"
                )));
            }
            gd.push(index);
        }
        first += n;
    }
    Ok(gd)
}

/// Fails if two directory entries name the same table; returns one past the highest
/// table index in use.
fn check_tables_unshared(gd: &[u32]) -> Result<u64> {
    let mut used: Vec<u32> = gd.iter().copied().filter(|&t| t != NO_GT).collect();
    used.sort_unstable();
    if let Some(w) = used.windows(2).find(|w| w[0] == w[1]) {
        let t = w[0];
        let mut entries = gd
            .iter()
            .enumerate()
            .filter(|(_, &x)| x == t)
            .map(|(i, _)| i);
        let a = entries.next().unwrap_or_default();
        let b = entries.next().unwrap_or_default();
        return Err(Error::invalid(format!(
            "grain directory entries {a} and {b} share grain table {t}"
        )));
    }
    Ok(used.last().map_or(0, |&t| u64::from(t) + 1))
}

/// The first grain slot no grain table entry can be using. From the file length when
/// the grain area is the last region and the file ends inside it (allocated grains
/// must lie inside the file); otherwise by scanning every grain table.
fn next_free_slot(
    storage: &dyn Storage,
    h: &ConstHeader,
    gd: &[u32],
    file_len: u64,
) -> Result<u64> {
    let start = h.grains_offset * SECTOR_SIZE;
    let end = (h.grains_offset + h.grains_size) * SECTOR_SIZE;
    if h.grains_last() && file_len < end {
        return Ok(file_len.saturating_sub(start).div_ceil(GRAIN_BYTES));
    }
    let slots = h.grain_slots();
    let mut next = 0u64;
    let mut buf = vec![0u8; GT_BYTES as usize];
    for &gt in gd.iter().filter(|&&t| t != NO_GT) {
        storage
            .read_exact_at(&mut buf, h.gt_byte_offset(gt))
            .map_err(|e| Error::io(format!("cannot read grain table {gt}"), e))?;
        for c in buf.chunks_exact(8) {
            let e = u64_at(c, 0);
            if e >> GTE_TYPE_SHIFT == GTE_ALLOCATED {
                let slot = decode_slot(e);
                if slot < slots {
                    next = next.max(slot + 1);
                }
            }
        }
    }
    Ok(next)
}
