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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::extent::new_grains::{leading_zero_grains, write_new_grains, NewGrains};
use crate::extent::{BelowFn, ExtentMapping};
use crate::limits::{GT_CACHE_BYTES, MAX_SESPARSE_CAPACITY_SECTORS, SECTOR_SIZE};
use crate::storage::{FileStorage, Storage};

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

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Decodes the grain slot of an allocated (type 3) grain table entry.
fn decode_slot(entry: u64) -> u64 {
    ((entry >> 48) & 0xFFF) | ((entry & 0xFFFF_FFFF_FFFF) << 12)
}

/// Encodes an allocated grain table entry for grain slot `slot` (at most 60 bits).
fn encode_slot(slot: u64) -> u64 {
    (GTE_ALLOCATED << GTE_TYPE_SHIFT) | ((slot & 0xFFF) << 48) | (slot >> 12)
}

/// The constant header (sector 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConstHeader {
    pub(crate) capacity: u64,
    pub(crate) volatile_offset: u64,
    pub(crate) volatile_size: u64,
    pub(crate) journal_header_offset: u64,
    pub(crate) journal_header_size: u64,
    pub(crate) journal_offset: u64,
    pub(crate) journal_size: u64,
    pub(crate) gd_offset: u64,
    pub(crate) gd_size: u64,
    pub(crate) gt_offset: u64,
    pub(crate) gt_size: u64,
    pub(crate) bitmap_offset: u64,
    pub(crate) bitmap_size: u64,
    pub(crate) backmap_offset: u64,
    pub(crate) backmap_size: u64,
    pub(crate) grains_offset: u64,
    pub(crate) grains_size: u64,
}

/// Byte offset of the first region field (`volatile_header_offset`).
const REGIONS_AT: usize = 80;
/// End of the fields; the rest of the sector is padding.
const FIELDS_END: usize = 208;

impl ConstHeader {
    /// Parses and validates the fields themselves (not the layout).
    pub(crate) fn parse(b: &[u8; HEADER_BYTES]) -> Result<ConstHeader> {
        let magic = u64_at(b, 0);
        if magic != SESPARSE_MAGIC {
            return Err(Error::invalid(format!(
                "not a seSparse extent: constant header magic is {magic:#018x}, not {SESPARSE_MAGIC:#x}"
            )));
        }
        let version = u64_at(b, 8);
        if version != SESPARSE_VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!(
                    "seSparse version {}.{} ({version:#018x}) is not 2.1",
                    version >> 32,
                    version & 0xFFFF_FFFF
                ),
            ));
        }
        let grain = u64_at(b, 24);
        if grain != SESPARSE_GRAIN_SECTORS {
            return Err(Error::invalid(format!(
                "seSparse grain size {grain} sectors is not {SESPARSE_GRAIN_SECTORS}"
            )));
        }
        let gt = u64_at(b, 32);
        if gt != SESPARSE_GT_SECTORS {
            return Err(Error::invalid(format!(
                "seSparse grain table size {gt} sectors is not {SESPARSE_GT_SECTORS}"
            )));
        }
        let flags = u64_at(b, 40);
        if flags != 0 {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!("seSparse header has unknown flags {flags:#x}"),
            ));
        }
        for (i, off) in [48usize, 56, 64, 72].into_iter().enumerate() {
            let v = u64_at(b, off);
            if v != 0 {
                return Err(Error::invalid(format!(
                    "seSparse header reserved field {} is {v:#x}, not 0",
                    i + 1
                )));
            }
        }
        if b[FIELDS_END..].iter().any(|&x| x != 0) {
            return Err(Error::invalid(
                "seSparse constant header padding (bytes 208..512) is not zero",
            ));
        }
        let capacity = u64_at(b, 16);
        if capacity > MAX_SESPARSE_CAPACITY_SECTORS {
            return Err(Error::invalid(format!(
                "seSparse capacity {capacity} sectors exceeds the limit of {MAX_SESPARSE_CAPACITY_SECTORS}"
            )));
        }
        let f = |i: usize| u64_at(b, REGIONS_AT + 8 * i);
        Ok(ConstHeader {
            capacity,
            volatile_offset: f(0),
            volatile_size: f(1),
            journal_header_offset: f(2),
            journal_header_size: f(3),
            journal_offset: f(4),
            journal_size: f(5),
            gd_offset: f(6),
            gd_size: f(7),
            gt_offset: f(8),
            gt_size: f(9),
            bitmap_offset: f(10),
            bitmap_size: f(11),
            backmap_offset: f(12),
            backmap_size: f(13),
            grains_offset: f(14),
            grains_size: f(15),
        })
    }

    fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        put_u64(&mut b, 0, SESPARSE_MAGIC);
        put_u64(&mut b, 8, SESPARSE_VERSION);
        put_u64(&mut b, 16, self.capacity);
        put_u64(&mut b, 24, SESPARSE_GRAIN_SECTORS);
        put_u64(&mut b, 32, SESPARSE_GT_SECTORS);
        for (i, (_, offset, size)) in self.regions().into_iter().skip(1).enumerate() {
            put_u64(&mut b, REGIONS_AT + 16 * i, offset);
            put_u64(&mut b, REGIONS_AT + 16 * i + 8, size);
        }
        b
    }

    /// Every region as `(name, first sector, sectors)`, the header first.
    pub(crate) fn regions(&self) -> [(&'static str, u64, u64); 9] {
        [
            ("the constant header", 0, 1),
            (
                "the volatile header",
                self.volatile_offset,
                self.volatile_size,
            ),
            (
                "the journal header",
                self.journal_header_offset,
                self.journal_header_size,
            ),
            ("the journal", self.journal_offset, self.journal_size),
            ("the grain directory", self.gd_offset, self.gd_size),
            ("the grain table area", self.gt_offset, self.gt_size),
            ("the free bitmap", self.bitmap_offset, self.bitmap_size),
            ("the backmap", self.backmap_offset, self.backmap_size),
            ("the grain area", self.grains_offset, self.grains_size),
        ]
    }

    /// Directory entries the capacity needs.
    pub(crate) fn needed_gdes(&self) -> u64 {
        self.capacity.div_ceil(SECTORS_PER_GT)
    }

    /// Grain tables the table area holds.
    pub(crate) fn gt_slots(&self) -> u64 {
        self.gt_size / SESPARSE_GT_SECTORS
    }

    /// Grains the grain area holds.
    pub(crate) fn grain_slots(&self) -> u64 {
        self.grains_size / SESPARSE_GRAIN_SECTORS
    }

    /// Checks the layout: every region addressable in bytes, the volatile header and
    /// directory large enough, no two regions overlapping.
    pub(crate) fn validate_layout(&self) -> Result<()> {
        let regions = self.regions();
        for &(what, offset, size) in &regions {
            let addressable = offset
                .checked_add(size)
                .and_then(|e| e.checked_mul(SECTOR_SIZE))
                .is_some();
            if !addressable {
                return Err(Error::invalid(format!(
                    "{what} (sector {offset}, {size} sectors) lies beyond any addressable offset"
                )));
            }
        }
        if self.volatile_size == 0 {
            return Err(Error::invalid(
                "the volatile header has a size of 0 sectors",
            ));
        }
        let needed = self.needed_gdes();
        let have = self.gd_size.saturating_mul(GDES_PER_SECTOR);
        if have < needed {
            return Err(Error::invalid(format!(
                "the grain directory holds {have} entries but a capacity of {} sectors needs {needed}",
                self.capacity
            )));
        }
        for (i, &(a, a_off, a_size)) in regions.iter().enumerate() {
            if a_size == 0 {
                continue;
            }
            for &(b, b_off, b_size) in &regions[i + 1..] {
                if b_size == 0 {
                    continue;
                }
                // Ends cannot overflow: checked above.
                if a_off < b_off + b_size && b_off < a_off + a_size {
                    return Err(Error::invalid(format!(
                        "{b} (sectors {b_off}..{}) overlaps {a} (sectors {a_off}..{})",
                        b_off + b_size,
                        a_off + a_size
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether no other region ends after the grain area.
    fn grains_last(&self) -> bool {
        let end = self.grains_offset + self.grains_size;
        self.regions()
            .iter()
            .all(|&(_, o, s)| s == 0 || o + s <= end)
    }

    /// Byte offset of grain table `index` (below [`ConstHeader::gt_slots`]).
    pub(crate) fn gt_byte_offset(&self, index: u32) -> u64 {
        (self.gt_offset + u64::from(index) * SESPARSE_GT_SECTORS) * SECTOR_SIZE
    }

    /// Byte offset of grain slot `slot` (below [`ConstHeader::grain_slots`]).
    pub(crate) fn slot_byte_offset(&self, slot: u64) -> u64 {
        (self.grains_offset + slot * SESPARSE_GRAIN_SECTORS) * SECTOR_SIZE
    }
}

/// Volatile header fields (the raw sector is kept so it is rewritten as read).
#[derive(Clone, Debug)]
pub(crate) struct VolatileHeader {
    raw: [u8; HEADER_BYTES],
    free_gt_number: u64,
}

impl VolatileHeader {
    pub(crate) fn parse(b: &[u8; HEADER_BYTES]) -> Result<VolatileHeader> {
        let magic = u64_at(b, 0);
        if magic != SESPARSE_VOLATILE_MAGIC {
            return Err(Error::invalid(format!(
                "seSparse volatile header magic is {magic:#018x}, not {SESPARSE_VOLATILE_MAGIC:#x}"
            )));
        }
        if u64_at(b, 24) != 0 {
            return Err(Error::new(
                ErrorKind::NeedsRepair,
                "seSparse journal must be replayed (replay_journal is set); journal replay is not supported",
            ));
        }
        if b[32..].iter().any(|&x| x != 0) {
            return Err(Error::invalid(
                "seSparse volatile header padding (bytes 32..512) is not zero",
            ));
        }
        Ok(VolatileHeader {
            raw: *b,
            free_gt_number: u64_at(b, 8),
        })
    }

    fn new() -> VolatileHeader {
        let mut raw = [0u8; HEADER_BYTES];
        put_u64(&mut raw, 0, SESPARSE_VOLATILE_MAGIC);
        VolatileHeader {
            raw,
            free_gt_number: 0,
        }
    }

    fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = self.raw;
        put_u64(&mut b, 8, self.free_gt_number);
        b
    }
}

/// What a grain table entry says about one grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GrainState {
    Unallocated,
    Zero,
    /// Data at this byte offset in the file.
    Data(u64),
}

#[derive(Debug)]
struct CachedGt {
    entries: Vec<u64>,
    dirty: bool,
    last_used: u64,
}

/// A bounded LRU cache of grain tables keyed by directory index.
#[derive(Debug)]
struct GtLru {
    capacity: usize,
    tables: HashMap<u64, CachedGt>,
    tick: u64,
}

impl GtLru {
    fn new(capacity: usize) -> GtLru {
        GtLru {
            capacity: capacity.max(1),
            tables: HashMap::new(),
            tick: 0,
        }
    }

    fn get(&mut self, index: u64) -> Option<&mut CachedGt> {
        self.tick += 1;
        let t = self.tick;
        let table = self.tables.get_mut(&index)?;
        table.last_used = t;
        Some(table)
    }

    fn evict_if_full(&mut self) -> Option<(u64, CachedGt)> {
        if self.tables.len() < self.capacity {
            return None;
        }
        let (&victim, _) = self.tables.iter().min_by_key(|(_, t)| t.last_used)?;
        self.tables.remove(&victim).map(|t| (victim, t))
    }

    fn insert(&mut self, index: u64, entries: Vec<u64>, dirty: bool) {
        self.tick += 1;
        self.tables.insert(
            index,
            CachedGt {
                entries,
                dirty,
                last_used: self.tick,
            },
        );
    }

    fn dirty_indexes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&i, _)| i)
            .collect();
        v.sort_unstable();
        v
    }
}

#[derive(Debug)]
struct State {
    /// Grain table index per needed directory entry, [`NO_GT`] for none.
    gd: Vec<u32>,
    /// Directory sectors (relative to the directory) with changed entries.
    gd_dirty: BTreeSet<u64>,
    volatile: VolatileHeader,
    volatile_dirty: bool,
    cache: GtLru,
    /// Next unused grain table index.
    next_gt: u64,
    /// Next unused grain slot.
    next_slot: u64,
    /// Bytes known to be in the file.
    file_len: u64,
    /// Something (data or tables) was written since the last sync.
    unsynced: bool,
    /// Grains being allocated by a writer right now.
    inflight: HashSet<u64>,
}

/// An open seSparse extent file. See the [module documentation](self) for what is
/// supported.
#[derive(Debug)]
pub struct SeSparseExtent {
    storage: Box<dyn Storage>,
    name: String,
    writable: bool,
    header: ConstHeader,
    capacity_bytes: u64,
    gt_slots: u64,
    grain_slots: u64,
    state: Mutex<State>,
    /// Signalled when in-flight grain allocations complete.
    allocated: Condvar,
}

/// Grains claimed by one writer: reserved slots, not yet in a grain table.
struct Claim {
    first: u64,
    n: u64,
    slot: u64,
    state: GrainState,
}

/// Releases a claim (also when the write failed) and wakes waiting writers.
struct ClaimGuard<'a> {
    ext: &'a SeSparseExtent,
    first: u64,
    n: u64,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut st = match self.ext.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for g in self.first..self.first + self.n {
            st.inflight.remove(&g);
        }
        drop(st);
        self.ext.allocated.notify_all();
    }
}

fn parse_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8).map(|c| u64_at(c, 0)).collect()
}

impl SeSparseExtent {
    /// Opens a seSparse extent on an already opened (and locked) file, validating the
    /// headers and the grain directory. Errors are [`ErrorKind::InvalidDisk`] for
    /// malformed files (naming the field or entry at fault),
    /// [`ErrorKind::UnsupportedDiskVersion`] for another version or unknown flags, and
    /// [`ErrorKind::NeedsRepair`] when the journal must be replayed.
    pub fn open(storage: FileStorage, writable: bool) -> Result<SeSparseExtent> {
        let name = storage.path().display().to_string();
        Self::open_storage(Box::new(storage), &name, writable)
    }

    /// Opens a seSparse extent on any [`Storage`] (an in-memory file in tests and
    /// fuzzing); `name` is used in error messages.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        name: &str,
        writable: bool,
    ) -> Result<SeSparseExtent> {
        Self::open_inner(storage, writable, name).map_err(|e| e.within(name))
    }

    fn open_inner(storage: Box<dyn Storage>, writable: bool, name: &str) -> Result<SeSparseExtent> {
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

        Ok(SeSparseExtent {
            storage,
            name: name.to_string(),
            writable,
            capacity_bytes: header.capacity * SECTOR_SIZE,
            gt_slots,
            grain_slots,
            header,
            state: Mutex::new(State {
                gd,
                gd_dirty: BTreeSet::new(),
                volatile,
                volatile_dirty: false,
                cache: GtLru::new((GT_CACHE_BYTES as u64 / GT_BYTES) as usize),
                next_gt,
                next_slot,
                file_len,
                unsynced: false,
                inflight: HashSet::new(),
            }),
            allocated: Condvar::new(),
        })
    }

    /// Waits (releasing the lock) until no writer is allocating grain `grain`.
    fn wait_for_grain<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        grain: u64,
    ) -> Result<MutexGuard<'a, State>> {
        while st.inflight.contains(&grain) {
            st = self
                .allocated
                .wait(st)
                .map_err(|_| Error::new(ErrorKind::Fail, "extent state poisoned"))?;
        }
        Ok(st)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| {
            Error::new(
                ErrorKind::Fail,
                format!("{}: extent state poisoned by a panic", self.name),
            )
        })
    }

    /// The extent's capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes per grain (4096).
    pub fn grain_bytes(&self) -> u64 {
        GRAIN_BYTES
    }

    /// Does nothing: seSparse has no "open for writing" mark that readers tolerate
    /// (see the module documentation). Kept for symmetry with the other extents.
    pub fn begin_write(&self) -> Result<()> {
        Ok(())
    }

    /// Loads grain table of directory entry `index` into the cache if there is one;
    /// returns whether there is.
    fn ensure_table(&self, st: &mut State, index: u64) -> Result<bool> {
        if st.cache.tables.contains_key(&index) {
            return Ok(true);
        }
        let gt = st.gd[index as usize];
        if gt == NO_GT {
            return Ok(false);
        }
        let mut buf = vec![0u8; GT_BYTES as usize];
        self.storage
            .read_exact_at(&mut buf, self.header.gt_byte_offset(gt))
            .map_err(|e| Error::io(format!("{}: cannot read grain table {gt}", self.name), e))?;
        let entries = parse_table(&buf);
        self.make_room(st)?;
        st.cache.insert(index, entries, false);
        Ok(true)
    }

    /// Evicts a table if the cache is full, writing it back first if it is dirty
    /// (data synced before).
    fn make_room(&self, st: &mut State) -> Result<()> {
        if let Some((index, table)) = st.cache.evict_if_full() {
            if table.dirty {
                if st.unsynced {
                    self.sync(st)?;
                }
                self.write_table(st, index, &table.entries)?;
            }
        }
        Ok(())
    }

    fn sync(&self, st: &mut State) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| Error::io(format!("{}: sync failed", self.name), e))?;
        st.unsynced = false;
        Ok(())
    }

    fn write_table(&self, st: &mut State, index: u64, entries: &[u64]) -> Result<()> {
        let gt = st.gd[index as usize];
        let mut bytes = Vec::with_capacity(GT_BYTES as usize);
        for e in entries {
            bytes.extend_from_slice(&e.to_le_bytes());
        }
        let at = self.header.gt_byte_offset(gt);
        self.storage
            .write_all_at(&bytes, at)
            .map_err(|e| Error::io(format!("{}: cannot write grain table {gt}", self.name), e))?;
        st.unsynced = true;
        st.file_len = st.file_len.max(at + GT_BYTES);
        Ok(())
    }

    /// Classifies grain `grain` (index within the extent, below capacity).
    fn grain_state(&self, st: &mut State, grain: u64) -> Result<GrainState> {
        let index = grain / GTES_PER_GT;
        if !self.ensure_table(st, index)? {
            return Ok(GrainState::Unallocated);
        }
        let gt = st.gd[index as usize];
        let i = grain % GTES_PER_GT;
        let entry = match st.cache.get(index) {
            Some(t) => t.entries[i as usize],
            None => return Err(Error::new(ErrorKind::Fail, "grain table left the cache")),
        };
        match classify_gte(entry, self.grain_slots) {
            Ok(GteKind::Unallocated) => Ok(GrainState::Unallocated),
            Ok(GteKind::Zero) => Ok(GrainState::Zero),
            Ok(GteKind::Slot(slot)) => {
                let offset = self.header.slot_byte_offset(slot);
                let needed = GRAIN_BYTES.min(self.capacity_bytes - grain * GRAIN_BYTES);
                if offset + needed > st.file_len {
                    return Err(Error::invalid(format!(
                        "{}: grain table {gt} entry {i} names grain slot {slot} at byte {offset}, past the end of the file ({} bytes)",
                        self.name, st.file_len
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

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity_bytes => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{}: {len} bytes at offset {offset} lie beyond the extent's {} bytes",
                    self.name, self.capacity_bytes
                ),
            )),
        }
    }

    /// Where the range starting at `offset` (bytes within the extent, below capacity)
    /// lives, and for how many bytes (at most `len`, clipped to the capacity) that
    /// answer holds: `Data` for allocated grains (consecutive grains contiguous in the
    /// file coalesced), `Zero` for zero and unmapped grains, `Unallocated` otherwise.
    pub fn map(&self, offset: u64, len: u64) -> Result<(ExtentMapping, u64)> {
        if offset >= self.capacity_bytes {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{}: offset {offset} is beyond the extent's {} bytes",
                    self.name, self.capacity_bytes
                ),
            ));
        }
        let mut st = self.lock()?;
        let g = GRAIN_BYTES;
        let end = offset + len.min(self.capacity_bytes - offset);
        let first_grain = offset / g;
        let first = self.grain_state(&mut st, first_grain)?;
        let mut covered = ((first_grain + 1) * g).min(end) - offset;
        let mut grain = first_grain + 1;
        while offset + covered < end {
            // Skip whole tables the directory does not have.
            if first == GrainState::Unallocated
                && grain.is_multiple_of(GTES_PER_GT)
                && st.gd[(grain / GTES_PER_GT) as usize] == NO_GT
            {
                covered = ((grain + GTES_PER_GT) * g).min(end) - offset;
                grain += GTES_PER_GT;
                continue;
            }
            let next = self.grain_state(&mut st, grain)?;
            let same = match (first, next) {
                (GrainState::Data(a), GrainState::Data(b)) => b == a + (grain - first_grain) * g,
                (x, y) => x == y,
            };
            if !same {
                break;
            }
            covered = ((grain + 1) * g).min(end) - offset;
            grain += 1;
        }
        let mapping = match first {
            GrainState::Unallocated => ExtentMapping::Unallocated,
            GrainState::Zero => ExtentMapping::Zero,
            GrainState::Data(o) => ExtentMapping::Data {
                file_offset: o + (offset - first_grain * g),
            },
        };
        Ok((mapping, covered))
    }

    /// The host file descriptor of the extent's file, if it is one.
    pub(crate) fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.storage.fd()
    }

    /// Reads file bytes at `file_offset` (as given by [`SeSparseExtent::map`]).
    pub fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_exact_at(buf, file_offset)
            .map_err(|e| Error::io(format!("{}: read failed", self.name), e))
    }

    /// Writes `data` at `offset` (bytes within the extent). Allocated grains are
    /// written in place; other grains get new slots in the grain area, a partly
    /// written one completed with what `below` reads (unallocated grain) or zeros
    /// (zero or unmapped grain). Grain tables are allocated as needed.
    pub fn write(&self, offset: u64, data: &[u8], below: BelowFn<'_>) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is open read-only", self.name),
            ));
        }
        self.check_range(offset, data.len() as u64)?;
        let g = GRAIN_BYTES;
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let rest = &data[pos..];
            let (mapping, run) = self.map(off, rest.len() as u64)?;
            let run = run as usize;
            match mapping {
                ExtentMapping::Data { file_offset } => {
                    self.storage
                        .write_all_at(&rest[..run], file_offset)
                        .map_err(|e| Error::io(format!("{}: write failed", self.name), e))?;
                    self.lock()?.unsynced = true;
                    pos += run;
                }
                ExtentMapping::Compressed { .. } => {
                    return Err(Error::new(
                        ErrorKind::Fail,
                        "a seSparse extent has no compressed grains",
                    ))
                }
                ExtentMapping::Zero | ExtentMapping::Unallocated => {
                    let zeros = leading_zero_grains(off, &rest[..run], g);
                    let marked = match mapping {
                        _ if zeros == 0 => 0,
                        ExtentMapping::Zero => zeros,
                        _ => self.mark_zero(off / g, zeros)?,
                    };
                    if marked > 0 {
                        pos += (marked * g) as usize;
                        continue;
                    }
                    let Some(claim) = self.claim(off, run as u64)? else {
                        continue; // allocated by another writer meanwhile
                    };
                    let _guard = ClaimGuard {
                        ext: self,
                        first: claim.first,
                        n: claim.n,
                    };
                    let at = self.header.slot_byte_offset(claim.slot);
                    let (used, end) = write_new_grains(
                        &*self.storage,
                        &self.name,
                        g,
                        self.capacity_bytes,
                        &NewGrains {
                            first: claim.first,
                            n: claim.n,
                            file_offset: at,
                            from_below: claim.state == GrainState::Unallocated,
                        },
                        off,
                        rest,
                        below,
                    )?;
                    self.commit_grains(&claim, end)?;
                    pos += used;
                }
            }
        }
        Ok(())
    }

    /// Gives up to `n` grains from `first` type 2 ("zero") entries where they have no
    /// data, writing no grain: zeros over a parent's data cost a table entry. Returns
    /// how many from `first` (0 if the first grain has data by now).
    fn mark_zero(&self, first: u64, n: u64) -> Result<u64> {
        let mut st = self.lock()?;
        st = self.wait_for_grain(st, first)?;
        let mut done = 0;
        while done < n {
            let grain = first + done;
            if (done > 0 && st.inflight.contains(&grain))
                || matches!(self.grain_state(&mut st, grain)?, GrainState::Data(_))
            {
                break;
            }
            let index = grain / GTES_PER_GT;
            if !self.ensure_table(&mut st, index)? {
                self.allocate_table(&mut st, index)?;
            }
            let Some(t) = st.cache.get(index) else {
                return Err(Error::new(
                    ErrorKind::Fail,
                    "grain table vanished from the cache",
                ));
            };
            t.entries[(grain % GTES_PER_GT) as usize] = GTE_ZERO << GTE_TYPE_SHIFT;
            t.dirty = true;
            done += 1;
        }
        Ok(done)
    }

    /// Claims the unallocated (or zero) grains at the start of `[off, off+len)` for
    /// this writer and reserves grain slots for them. Waits while another writer is
    /// allocating the first grain; returns `None` if that grain has data by now. No
    /// lock is held once this returns.
    fn claim(&self, off: u64, len: u64) -> Result<Option<Claim>> {
        let g = GRAIN_BYTES;
        let first = off / g;
        let mut st = self.lock()?;
        st = self.wait_for_grain(st, first)?;
        let state = self.grain_state(&mut st, first)?;
        if let GrainState::Data(_) = state {
            return Ok(None);
        }
        let mut n = 1;
        if off.is_multiple_of(g) {
            let max_n = len / g;
            while n < max_n
                && !st.inflight.contains(&(first + n))
                && self.grain_state(&mut st, first + n)? == state
            {
                n += 1;
            }
        }
        let slot = st.next_slot;
        match slot.checked_add(n) {
            Some(end) if end <= self.grain_slots && end <= MAX_SLOT => st.next_slot = end,
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
        for i in 0..n {
            st.inflight.insert(first + i);
        }
        Ok(Some(Claim {
            first,
            n,
            slot,
            state,
        }))
    }

    /// Points the grain table entries of a claim's grains at its consecutive slots,
    /// allocating grain tables where the directory has none.
    fn commit_grains(&self, claim: &Claim, file_end: u64) -> Result<()> {
        let mut st = self.lock()?;
        st.unsynced = true;
        st.file_len = st.file_len.max(file_end);
        for i in 0..claim.n {
            let grain = claim.first + i;
            let index = grain / GTES_PER_GT;
            if !self.ensure_table(&mut st, index)? {
                self.allocate_table(&mut st, index)?;
            }
            match st.cache.get(index) {
                Some(t) => {
                    t.entries[(grain % GTES_PER_GT) as usize] = encode_slot(claim.slot + i);
                    t.dirty = true;
                }
                None => {
                    return Err(Error::new(
                        ErrorKind::Fail,
                        "grain table vanished from the cache",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Gives directory entry `index` a new, empty grain table (the next unused index
    /// of the table area). It reaches the file before the directory entry does.
    fn allocate_table(&self, st: &mut State, index: u64) -> Result<()> {
        let gt = st.next_gt;
        if gt >= self.gt_slots || gt >= u64::from(NO_GT) {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                format!(
                    "{}: the grain table area is full ({} tables)",
                    self.name, self.gt_slots
                ),
            ));
        }
        self.make_room(st)?;
        st.next_gt = gt + 1;
        st.gd[index as usize] = gt as u32;
        st.gd_dirty.insert(index / GDES_PER_SECTOR);
        st.volatile.free_gt_number = st.next_gt;
        st.volatile_dirty = true;
        st.cache.insert(index, vec![0; GTES_PER_GT as usize], true);
        Ok(())
    }

    /// Writes back dirty metadata in crash-consistent order, syncing between steps:
    /// grain data, grain tables, grain directory entries, volatile header.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock()?;
        let dirty = st.cache.dirty_indexes();
        if st.unsynced && !dirty.is_empty() {
            self.sync(&mut st)?;
        }
        for index in dirty {
            let Some(entries) = st.cache.get(index).map(|t| t.entries.clone()) else {
                continue;
            };
            self.write_table(&mut st, index, &entries)?;
            if let Some(t) = st.cache.get(index) {
                t.dirty = false;
            }
        }
        if !st.gd_dirty.is_empty() {
            if st.unsynced {
                self.sync(&mut st)?;
            }
            let sectors: Vec<u64> = st.gd_dirty.iter().copied().collect();
            let gd_at = self.header.gd_offset * SECTOR_SIZE;
            for sector in sectors {
                let first = (sector * GDES_PER_SECTOR) as usize;
                let last = (first + GDES_PER_SECTOR as usize).min(st.gd.len());
                let mut bytes = Vec::with_capacity((last - first) * 8);
                for &t in &st.gd[first..last] {
                    let e = if t == NO_GT {
                        0
                    } else {
                        GDE_TABLE | u64::from(t)
                    };
                    bytes.extend_from_slice(&e.to_le_bytes());
                }
                self.storage
                    .write_all_at(&bytes, gd_at + first as u64 * 8)
                    .map_err(|e| {
                        Error::io(
                            format!("{}: cannot write the grain directory", self.name),
                            e,
                        )
                    })?;
                st.unsynced = true;
                st.gd_dirty.remove(&sector);
            }
        }
        if st.volatile_dirty {
            if st.unsynced {
                self.sync(&mut st)?;
            }
            let bytes = st.volatile.to_bytes();
            self.storage
                .write_all_at(&bytes, self.header.volatile_offset * SECTOR_SIZE)
                .map_err(|e| {
                    Error::io(
                        format!("{}: cannot write the volatile header", self.name),
                        e,
                    )
                })?;
            st.volatile_dirty = false;
            st.unsynced = true;
        }
        if st.unsynced {
            self.sync(&mut st)?;
        }
        Ok(())
    }

    /// A clean close: [`SeSparseExtent::flush`].
    pub fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Size of the extent file in bytes.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self.lock()?.file_len)
    }
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

fn align_region(sectors: u64) -> u64 {
    sectors.max(1).div_ceil(REGION_ALIGN_SECTORS) * REGION_ALIGN_SECTORS
}

/// The header [`create_sesparse`] writes for `capacity` sectors (already checked
/// against the limit).
fn new_layout(capacity: u64) -> ConstHeader {
    let gdes = capacity.div_ceil(SECTORS_PER_GT);
    let grains = capacity.div_ceil(SESPARSE_GRAIN_SECTORS);
    let gd_size = align_region((gdes * 8).div_ceil(SECTOR_SIZE));
    let gt_size = align_region(gdes * SESPARSE_GT_SECTORS);
    let bitmap_size = align_region(grains.div_ceil(8).div_ceil(SECTOR_SIZE));
    let backmap_size = align_region((grains * 8).div_ceil(SECTOR_SIZE));
    let journal_offset = REGION_ALIGN_SECTORS;
    let journal_size = REGION_ALIGN_SECTORS;
    let gd_offset = journal_offset + journal_size;
    let gt_offset = gd_offset + gd_size;
    let bitmap_offset = gt_offset + gt_size;
    let backmap_offset = bitmap_offset + bitmap_size;
    let grains_offset = backmap_offset + backmap_size;
    ConstHeader {
        capacity,
        volatile_offset: 1,
        volatile_size: 1,
        journal_header_offset: 2,
        journal_header_size: 2,
        journal_offset,
        journal_size,
        gd_offset,
        gd_size,
        gt_offset,
        gt_size,
        bitmap_offset,
        bitmap_size,
        backmap_offset,
        backmap_size,
        grains_offset,
        grains_size: grains * SESPARSE_GRAIN_SECTORS,
    }
}

/// Creates a new, empty seSparse extent of `capacity_sectors` in `storage` (an
/// already created, empty file) with the layout ESXi uses (see the module
/// documentation): constant and volatile headers written, every other region zeros,
/// the file extended to the start of the grain area, then synced.
pub fn create_sesparse(storage: &FileStorage, capacity_sectors: u64) -> Result<()> {
    let name = storage.path().display().to_string();
    if capacity_sectors == 0 || capacity_sectors > MAX_SESPARSE_CAPACITY_SECTORS {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{name}: a seSparse extent holds 1 to {MAX_SESPARSE_CAPACITY_SECTORS} sectors, not {capacity_sectors}"
            ),
        ));
    }
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("{name}: cannot read file size"), e))?;
    if len != 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{name}: a new seSparse extent needs an empty file, not one of {len} bytes"),
        ));
    }
    let h = new_layout(capacity_sectors);
    debug_assert!(h.gt_offset + h.gt_size <= QEMU_MAX_GT_SECTOR);
    h.validate_layout().map_err(|e| e.within(&name))?;
    let io = |what: &str, e| Error::io(format!("{name}: cannot {what}"), e);
    storage
        .write_all_at(&h.to_bytes(), 0)
        .map_err(|e| io("write the seSparse header", e))?;
    storage
        .write_all_at(
            &VolatileHeader::new().to_bytes(),
            h.volatile_offset * SECTOR_SIZE,
        )
        .map_err(|e| io("write the seSparse volatile header", e))?;
    storage
        .set_len(h.grains_offset * SECTOR_SIZE)
        .map_err(|e| io("extend the file", e))?;
    storage.sync().map_err(|e| io("sync", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LockMode;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;
    /// Layout of a 100 MiB extent made by `create_sesparse` (sectors).
    const GD: u64 = 4096;
    const GTS: u64 = 6144;
    const GRAINS: u64 = 12288;

    fn make(dir: &Path, capacity_sectors: u64) -> PathBuf {
        let p = dir.join("d-sesparse.vmdk");
        let s = FileStorage::create_new(&p).unwrap();
        create_sesparse(&s, capacity_sectors).unwrap();
        p
    }

    fn open(p: &Path, writable: bool) -> Result<SeSparseExtent> {
        let s = FileStorage::open(p, writable, LockMode::None)?;
        SeSparseExtent::open(s, writable)
    }

    fn poke(p: &Path, at: u64, bytes: &[u8]) {
        let s = FileStorage::open(p, true, LockMode::None).unwrap();
        s.write_all_at(bytes, at).unwrap();
    }

    /// What the chain below reads in these tests: a pattern that depends on the offset.
    fn parent_byte(off: u64) -> u8 {
        (off / 512 % 251) as u8 ^ 0x5a
    }

    fn parent(off: u64, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = parent_byte(off + i as u64);
        }
        Ok(())
    }

    fn zeros(_: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    /// Reads through the extent the way the chain walk does.
    fn read(ext: &SeSparseExtent, off: u64, buf: &mut [u8], below: BelowFn<'_>) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = off + pos as u64;
            let (m, run) = ext.map(o, (buf.len() - pos) as u64)?;
            assert!(run > 0);
            let piece = &mut buf[pos..pos + run as usize];
            match m {
                ExtentMapping::Data { file_offset } => ext.read_data(file_offset, piece)?,
                ExtentMapping::Zero => piece.fill(0),
                ExtentMapping::Unallocated => below(o, piece)?,
                ExtentMapping::Compressed { .. } => panic!("no compressed grains"),
            }
            pos += run as usize;
        }
        Ok(())
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7) % 253) as u8)
            .collect()
    }

    fn check_all(ext: &SeSparseExtent, model: &[u8], below: BelowFn<'_>) {
        let mut got = vec![0u8; model.len()];
        read(ext, 0, &mut got, below).unwrap();
        if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
            panic!("first difference at byte {i}");
        }
    }

    #[test]
    fn layout_of_100_mib_matches_the_hostd_example() {
        let h = new_layout(204_800);
        let got: Vec<(u64, u64)> = h.regions().iter().map(|&(_, o, s)| (o, s)).collect();
        assert_eq!(
            got,
            vec![
                (0, 1),
                (1, 1),
                (2, 2),
                (2048, 2048),
                (GD, 2048),
                (GTS, 2048),
                (8192, 2048),
                (10240, 2048),
                (GRAINS, 204_800)
            ]
        );
        let b = h.to_bytes();
        assert_eq!(ConstHeader::parse(&b).unwrap(), h);
        h.validate_layout().unwrap();
        // The largest disk keeps every grain table below qemu's 32-bit sector limit.
        let big = new_layout(MAX_SESPARSE_CAPACITY_SECTORS);
        big.validate_layout().unwrap();
        assert!(big.gt_offset + big.gt_size <= QEMU_MAX_GT_SECTOR);
        assert_eq!(big.needed_gdes(), 1 << 22);
    }

    #[test]
    fn extent_is_send_sync() {
        fn check<T: Send + Sync + std::fmt::Debug>() {}
        check::<SeSparseExtent>();
    }

    #[test]
    fn slot_encoding_rotates_twelve_bits() {
        // The doc's hand-made example: cluster 4097.
        let e = encode_slot(4097);
        assert_eq!(e, 0x3001_0000_0000_0001);
        assert_eq!(decode_slot(e), 4097);
        for slot in [0, 1, 0xFFF, 0x1000, 123_456_789, MAX_SLOT] {
            assert_eq!(decode_slot(encode_slot(slot)), slot);
            assert_eq!(encode_slot(slot) >> 60, GTE_ALLOCATED);
        }
    }

    #[test]
    fn new_extent_is_unallocated_and_created_file_is_as_described() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 204_800);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), GRAINS * 512);
        let ext = open(&p, false).unwrap();
        assert_eq!(ext.capacity_bytes(), 100 * MIB);
        assert_eq!(
            ext.map(0, 100 * MIB).unwrap(),
            (ExtentMapping::Unallocated, 100 * MIB)
        );
        assert_eq!(
            ext.map(100 * MIB - 1, 10).unwrap(),
            (ExtentMapping::Unallocated, 1)
        );
        assert_eq!(
            ext.map(100 * MIB, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        let e = ext.write(0, &[1], &zeros).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        // A second create into a non-empty file is refused.
        let s = FileStorage::open(&p, true, LockMode::None).unwrap();
        let e = create_sesparse(&s, 8).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let q = dir.path().join("z");
        let s = FileStorage::create_new(&q).unwrap();
        assert_eq!(
            create_sesparse(&s, 0).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            create_sesparse(&s, MAX_SESPARSE_CAPACITY_SECTORS + 1)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn writes_read_back_with_copy_on_write_from_below_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        // Three grain tables, a capacity that ends in the middle of a grain.
        let cap_sectors = 2 * 32_768 + 4000 + 3;
        let cap = cap_sectors * 512;
        let p = make(dir.path(), cap_sectors);
        let mut model: Vec<u8> = (0..cap).map(parent_byte).collect();
        let writes: Vec<(u64, usize)> = vec![
            (0, 512),
            (3 * 4096 + 100, 10_000),
            (2 * MIB, MIB as usize),
            (16 * MIB - 6000, 20_000),
            (5 * MIB, 8192),
            (cap - 700, 700),
            (2 * MIB + 4000, 300),
            (33 * MIB, 3 * 4096),
            (33 * MIB + 4096 + 17, 1),
        ];
        {
            let ext = open(&p, true).unwrap();
            ext.begin_write().unwrap();
            for (k, &(off, len)) in writes.iter().enumerate() {
                let data = if k == 4 {
                    vec![0u8; len]
                } else {
                    pattern(k as u64, len)
                };
                ext.write(off, &data, &parent).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            check_all(&ext, &model, &parent);
            ext.flush().unwrap();
            ext.close().unwrap();
        }
        let len_after_first = std::fs::metadata(&p).unwrap().len();
        let ext = open(&p, false).unwrap();
        check_all(&ext, &model, &parent);
        // Consecutive grains written together are contiguous and answered at once.
        let (m, run) = ext.map(2 * MIB, MIB).unwrap();
        assert!(matches!(m, ExtentMapping::Data { .. }));
        assert_eq!(run, MIB);
        drop(ext);

        // Writing again after a reopen never reuses a slot.
        let ext = open(&p, true).unwrap();
        let data = pattern(99, 4096 * 3);
        ext.write(20 * MIB + 5, &data, &parent).unwrap();
        model[(20 * MIB + 5) as usize..(20 * MIB + 5) as usize + data.len()].copy_from_slice(&data);
        ext.close().unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            len_after_first + 4 * 4096
        );
        let ext = open(&p, false).unwrap();
        check_all(&ext, &model, &parent);
        assert!(ext.write(cap - 1, &[0, 0], &parent).is_err());
    }

    #[test]
    fn zero_and_unmapped_grains_read_as_zeros_and_are_completed_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 204_800);
        poke(&p, GD * 512, &(GDE_TABLE | 3).to_le_bytes());
        let mut gt = vec![0u8; GT_BYTES as usize];
        gt[8..16].copy_from_slice(&(GTE_ZERO << 60).to_le_bytes()); // grain 1
        gt[16..24].copy_from_slice(&((GTE_UNMAPPED << 60) | 77).to_le_bytes()); // grain 2
        poke(&p, (GTS + 3 * 64) * 512, &gt);
        let ext = open(&p, true).unwrap();
        assert_eq!(
            ext.map(0, 5 * 4096).unwrap(),
            (ExtentMapping::Unallocated, 4096)
        );
        assert_eq!(
            ext.map(4096 + 10, 5 * 4096).unwrap(),
            (ExtentMapping::Zero, 2 * 4096 - 10)
        );
        ext.write(4096 + 100, &[7; 10], &parent).unwrap();
        ext.write(2 * 4096 + 4000, &[9; 96], &parent).unwrap();
        let mut model: Vec<u8> = (0..3 * 4096).map(parent_byte).collect();
        model[4096..3 * 4096].fill(0);
        model[4096 + 100..4096 + 110].fill(7);
        model[2 * 4096 + 4000..3 * 4096].fill(9);
        let mut got = vec![0u8; model.len()];
        read(&ext, 0, &mut got, &parent).unwrap();
        assert_eq!(got, model);
        ext.close().unwrap();
        // The new table index follows the highest one in use; the volatile header says so.
        let mut vb = [0u8; 8];
        let s = FileStorage::open(&p, false, LockMode::None).unwrap();
        s.read_exact_at(&mut vb, 512 + 8).unwrap();
        assert_eq!(u64::from_le_bytes(vb), 0);
        drop(s);
        let ext = open(&p, true).unwrap();
        ext.write(20 * MIB, &[1; 4096], &parent).unwrap();
        ext.close().unwrap();
        let s = FileStorage::open(&p, false, LockMode::None).unwrap();
        s.read_exact_at(&mut vb, 512 + 8).unwrap();
        assert_eq!(u64::from_le_bytes(vb), 5);
        s.read_exact_at(&mut vb, GD * 512 + 8).unwrap();
        assert_eq!(u64::from_le_bytes(vb), GDE_TABLE | 4);
    }

    #[test]
    fn preallocated_file_is_scanned_for_the_next_free_slot() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 204_800);
        let ext = open(&p, true).unwrap();
        ext.write(0, &pattern(1, 4096 * 2), &zeros).unwrap();
        ext.close().unwrap();
        drop(ext);
        let s = FileStorage::open(&p, true, LockMode::None).unwrap();
        s.set_len((GRAINS + 204_800) * 512).unwrap();
        drop(s);
        let ext = open(&p, true).unwrap();
        ext.write(MIB, &pattern(2, 4096), &zeros).unwrap();
        ext.close().unwrap();
        let ext = open(&p, false).unwrap();
        let mut got = vec![0u8; 4096 * 2];
        read(&ext, 0, &mut got, &zeros).unwrap();
        assert_eq!(got, pattern(1, 4096 * 2));
        assert_eq!(
            ext.map(MIB, 4096).unwrap().0,
            ExtentMapping::Data {
                file_offset: (GRAINS * 512) + 2 * 4096
            }
        );
    }

    #[test]
    fn grain_tables_beyond_the_cache_are_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let tables = (GT_CACHE_BYTES as u64 / GT_BYTES) + 10;
        let p = make(dir.path(), tables * SECTORS_PER_GT);
        let ext = open(&p, true).unwrap();
        for t in 0..tables {
            ext.write(t * 16 * MIB + t, &pattern(t, 100), &zeros)
                .unwrap();
        }
        ext.close().unwrap();
        drop(ext);
        let ext = open(&p, false).unwrap();
        for t in 0..tables {
            let mut got = vec![0u8; 100];
            read(&ext, t * 16 * MIB + t, &mut got, &zeros).unwrap();
            assert_eq!(got, pattern(t, 100), "table {t}");
        }
    }

    #[test]
    fn concurrent_writers_on_disjoint_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 204_800);
        let ext = Arc::new(open(&p, true).unwrap());
        // Unaligned neighbouring ranges: threads share the grains at their borders.
        let span = 5 * MIB + 1234;
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let ext = Arc::clone(&ext);
            handles.push(std::thread::spawn(move || {
                let base = 1000 + t * span;
                let data = pattern(t + 10, span as usize);
                // Many small writes in a scattered order.
                let chunk = 3000usize;
                let n = data.len().div_ceil(chunk);
                for k in 0..n {
                    let k = (k * 7 + t as usize) % n;
                    let s = k * chunk;
                    let e = (s + chunk).min(data.len());
                    ext.write(base + s as u64, &data[s..e], &parent).unwrap();
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        let mut model: Vec<u8> = (0..100 * MIB).map(parent_byte).collect();
        for t in 0..4u64 {
            let base = (1000 + t * span) as usize;
            model[base..base + span as usize].copy_from_slice(&pattern(t + 10, span as usize));
        }
        check_all(&ext, &model, &parent);
        ext.close().unwrap();
        drop(ext);
        let ext = open(&p, false).unwrap();
        check_all(&ext, &model, &parent);
    }

    /// Opening (read-only and read-write) fails with `kind` and a message containing
    /// `needle`, and leaves the file unchanged.
    fn expect_open_error(p: &Path, kind: ErrorKind, needle: &str) {
        let before = std::fs::read(p).unwrap();
        for writable in [false, true] {
            let e = open(p, writable).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
        }
        assert!(std::fs::read(p).unwrap() == before, "file changed");
    }

    fn hostile(poke_at: u64, value: u64, kind: ErrorKind, needle: &str) {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 204_800);
        poke(&p, poke_at, &value.to_le_bytes());
        expect_open_error(&p, kind, needle);
    }

    #[test]
    fn hostile_constant_headers_are_refused() {
        let inv = ErrorKind::InvalidDisk;
        hostile(0, 0xCAFE_CAFE, inv, "constant header magic");
        hostile(
            8,
            0x0000_0001_0000_0001,
            ErrorKind::UnsupportedDiskVersion,
            "version 1.1",
        );
        hostile(16, u64::MAX, inv, "capacity");
        hostile(24, 16, inv, "grain size 16");
        hostile(24, 0, inv, "grain size 0");
        hostile(32, 128, inv, "grain table size 128");
        hostile(40, 1, ErrorKind::UnsupportedDiskVersion, "flags");
        hostile(56, 1, inv, "reserved field 2");
        hostile(300, 1, inv, "padding");
        // Regions: overflow, overlaps, a directory too small, past the end of the file.
        hostile(80, u64::MAX, inv, "volatile header (sector");
        hostile(88, 0, inv, "size of 0");
        hostile(200, u64::MAX / 2, inv, "grain area (sector");
        hostile(128, 6144, inv, "overlaps the grain directory");
        hostile(128, 0, inv, "overlaps the constant header");
        hostile(136, 0, inv, "holds 0 entries");
        hostile(80, 1 << 40, inv, "past the end of the file");
        hostile(128, 1 << 40, inv, "grain directory (sectors");
    }

    #[test]
    fn hostile_volatile_headers_are_refused() {
        hostile(
            512,
            0xCAFE_BABE,
            ErrorKind::InvalidDisk,
            "volatile header magic",
        );
        hostile(
            512 + 24,
            1,
            ErrorKind::NeedsRepair,
            "journal must be replayed",
        );
        hostile(
            512 + 100,
            1,
            ErrorKind::InvalidDisk,
            "volatile header padding",
        );
    }

    #[test]
    fn hostile_grain_directories_are_refused() {
        let inv = ErrorKind::InvalidDisk;
        hostile(
            GD * 512,
            0x2000_0000_0000_0001,
            inv,
            "entry 0 is 0x2000000000000001",
        );
        hostile(GD * 512 + 8, 0x1000_0001_0000_0000, inv, "entry 1 is");
        hostile(GD * 512 + 16, 7, inv, "neither 0 nor");
        hostile(
            GD * 512,
            GDE_TABLE | 32,
            inv,
            "names grain table 32, outside",
        );
        hostile(
            GD * 512,
            GDE_TABLE | 0xFFFF_FFFF,
            inv,
            "outside the grain table area",
        );
        // Two entries sharing a table.
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 204_800);
        poke(&p, GD * 512 + 8, &(GDE_TABLE | 2).to_le_bytes());
        poke(&p, GD * 512 + 48, &(GDE_TABLE | 2).to_le_bytes());
        expect_open_error(&p, inv, "entries 1 and 6 share grain table 2");
        // A table past the end of the file (the area reaches beyond it).
        let p2 = dir.path().join("short");
        std::fs::copy(&p, &p2).unwrap();
        poke(&p2, GD * 512 + 48, &0u64.to_le_bytes());
        let s = FileStorage::open(&p2, true, LockMode::None).unwrap();
        s.set_len((GTS + 64) * 512).unwrap();
        drop(s);
        expect_open_error(
            &p2,
            inv,
            "grain table 2 (grain directory entry 1) ends at byte",
        );
        // Too short for a header.
        let p3 = dir.path().join("tiny");
        std::fs::write(&p3, [0u8; 100]).unwrap();
        expect_open_error(&p3, inv, "too short");
    }

    #[test]
    fn hostile_grain_table_entries_fail_on_use() {
        let cases: [(u64, &str); 4] = [
            (
                encode_slot(25_600),
                "names grain slot 25600, past the grain area",
            ),
            (encode_slot(25_599), "past the end of the file"),
            (0x0000_0000_0000_0005, "non-zero payload"),
            (0x7000_0000_0000_0000, "unknown grain type 0x7"),
        ];
        for (entry, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            let p = make(dir.path(), 204_800);
            poke(&p, GD * 512, &GDE_TABLE.to_le_bytes());
            poke(&p, GTS * 512 + 8 * 5, &entry.to_le_bytes());
            let before = std::fs::read(&p).unwrap();
            for writable in [false, true] {
                let ext = open(&p, writable).unwrap();
                // Grains before it are fine; the bad one stops the answer.
                assert_eq!(
                    ext.map(0, 4096 * 5).unwrap(),
                    (ExtentMapping::Unallocated, 4096 * 5)
                );
                let e = ext.map(0, 4096 * 6).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidDisk);
                assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
                if writable {
                    let e = ext.write(4096 * 5 + 1, &[1], &zeros).unwrap_err();
                    assert_eq!(e.kind(), ErrorKind::InvalidDisk);
                }
            }
            assert!(std::fs::read(&p).unwrap() == before, "file changed");
        }
    }
}
